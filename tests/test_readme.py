"""The README's Python API example runs as written, on a real store and mapper in the working folder."""
import re
from pathlib import Path

from cfbd_fast.demo import train_demo_mapper, write_demo_stores
from cfbd_fast.mapper import save_mapper

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Python API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    scan_store, ref = write_demo_stores(tmp_path, rows=5000, dim=64, poison_rate=0.01, seed=2, reference_rows=5000,
                                        progress=False)
    scan_store.rename(tmp_path / "cc3m.cfbd")
    save_mapper(train_demo_mapper(ref, seed=2), tmp_path / "mapper.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "cc3m.scan" / "summary.json").exists()
    assert namespace["c"].shape == (4096,) and namespace["z"].shape == (4096,)
    assert not namespace["bad"].any()
