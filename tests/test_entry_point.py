import importlib.metadata
import subprocess
import sys
import textwrap


def test_zc_is_registered_as_a_dynamo_backend():
    entry_points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    (zc_entry,) = [e for e in entry_points if e.name == "zc"]
    assert zc_entry.value == "zc.dynamo_backend:zc"
    from zc.dynamo_backend import zc

    assert zc_entry.load() is zc


def test_backend_zc_works_without_importing_zc():
    script = textwrap.dedent(
        """
        import sys
        import torch
        assert "zc" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        x = torch.randn(2, 8)
        with torch.no_grad():
            out = torch.compile(model, backend="zc")(x)
            torch.testing.assert_close(out, model(x))
        assert "zc.dynamo_backend" in sys.modules
        from torch._dynamo import list_backends
        assert "zc" in list_backends()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
