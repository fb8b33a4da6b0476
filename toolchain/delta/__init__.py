"""OSD fine-tune deltas (arXiv 2511.02681): extract ΔW, compress it to a bit budget, write a delta file."""
