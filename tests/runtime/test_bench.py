"""``bench`` and ``profile`` are runtime commands: they must work with torch blocked, as on a target."""

import json
import subprocess
import sys
import textwrap

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum", "onnx"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(BLOCK) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_bench_with_torch_blocked(tiny_package, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(f"""
        from edgepack.runtime.cli import main
        sys.exit(main(["bench", {str(tiny_package)!r}, "--max-tokens", "4", "--fill", "40",
                       "--device", "raspberry-pi-zero-2w", "--json", {str(out)!r}]))
    """)
    assert proc.returncode in (0, 3), proc.stderr
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 4 and all(r["new_tokens"] == 4 for r in report["runs"])
    assert report["context_filled"] >= 40
    assert report["baseline_rss_bytes"] <= report["loaded_rss_bytes"] <= report["peak_rss_bytes"]
    assert report["device"]["name"] == "raspberry-pi-zero-2w"


def test_profile_measures_host_with_torch_blocked():
    proc = _run("""
        import json
        from edgepack.runtime.profiling import measure
        m = measure()
        print(json.dumps(m.to_dict()))
    """)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["cores"] >= 1 and m["ram_mb"] > 0 and m["bandwidth_gb_s"] > 0
    assert {"float32", "int8", "int4"} <= set(m["matmul_gops"]), "the hand-written ONNX graphs must load"
    assert "CPUExecutionProvider" in m["execution_providers"]
