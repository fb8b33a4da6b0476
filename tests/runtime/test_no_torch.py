"""The runtime must work where torch and transformers are absent: prove it in a fresh interpreter."""

import subprocess
import sys
import textwrap


def test_runtime_imports_no_torch(tiny_package):
    code = textwrap.dedent(f"""
        import sys
        import edgepack.runtime as rt
        import edgepack.runtime.cli
        model = rt.load({str(tiny_package)!r})
        out = model.generate("hello", max_new_tokens=5)
        assert len(out.tokens) >= 1, out
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers", "optimum"}})
        print("HEAVY", heavy)
        assert not heavy, heavy
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_runtime_works_with_torch_blocked(tiny_package):
    # Make importing torch fail outright, as on a device without it, and run the CLI.
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "optimum"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from edgepack.runtime.cli import main
        sys.exit(main(["run", {str(tiny_package)!r}, "hello", "--max-tokens", "3"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
