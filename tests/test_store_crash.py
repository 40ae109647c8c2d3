"""Store durability: a writer killed mid-append, and a fuzz of truncated / bit-flipped stores (run in subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from cfbd_fast.store import EmbeddingStore

BATCHES, BATCH_ROWS, DIM = 12, 3000, 256

# Appends batch b = f(b) to a store, creating it or resuming after its committed rows; reports each commit.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from cfbd_fast.store import EmbeddingStore

    path, batches, batch_rows, dim = sys.argv[1], *map(int, sys.argv[2:5])
    try:
        store = EmbeddingStore.open(path, mode="a")
    except FileNotFoundError:
        store = EmbeddingStore.create(path, dim=dim, dtype="float32", model="m")
    with store:
        for batch in range(len(store) // batch_rows, batches):
            rng = np.random.default_rng(batch)
            image = rng.standard_normal((batch_rows, dim), dtype=np.float32)
            text = rng.standard_normal((batch_rows, dim), dtype=np.float32)
            captions = [f"b{batch} r{i}" for i in range(batch_rows)]
            store.append(image=image, text=text, meta={"caption": captions, "key": captions})
            print("committed", len(store), flush=True)
""")


def _run_writer(path) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(path), str(BATCHES), str(BATCH_ROWS), str(DIM)], check=True)


def test_sigkill_mid_append_leaves_a_committed_prefix_and_resumes(tmp_path):
    killed = tmp_path / "killed.cfbd"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(killed), str(BATCHES), str(BATCH_ROWS), str(DIM)],
                            stdout=subprocess.PIPE, text=True)
    reported = []
    while len(reported) < 2:
        line = proc.stdout.readline()
        assert line, "writer exited before reporting two commits"
        reported.append(int(line.split()[1]))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    reference = tmp_path / "reference.cfbd"
    _run_writer(reference)
    with EmbeddingStore.open(killed) as store, EmbeddingStore.open(reference) as full:
        rows = len(store)
        assert rows >= reported[-1] and rows % BATCH_ROWS == 0 and rows < BATCHES * BATCH_ROWS
        assert np.array_equal(store.image, full.image[:rows]) and np.array_equal(store.text, full.text[:rows])
        assert store.meta.equals(full.meta.slice(0, rows))

    _run_writer(killed)  # resume
    with EmbeddingStore.open(killed) as store, EmbeddingStore.open(reference) as full:
        assert len(store) == len(full) == BATCHES * BATCH_ROWS
        assert np.array_equal(store.image, full.image) and np.array_equal(store.text, full.text)
        assert store.meta.equals(full.meta)
        assert store.fingerprint == full.fingerprint
    for name in ("image.emb", "text.emb"):
        assert os.path.getsize(killed / name) == os.path.getsize(reference / name)


# Mutates copies of a valid store ITERATIONS times; every open/read must succeed or raise StoreFormatError/OSError.
FUZZ = textwrap.dedent("""
    import json, random, shutil, sys
    from pathlib import Path
    import numpy as np
    from cfbd_fast.errors import StoreFormatError
    from cfbd_fast.store import EmbeddingStore

    root, iterations = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(3)
    image = rng.standard_normal((40, 8)).astype(np.float16)
    meta = {"caption": [f"c{i}" for i in range(40)], "key": [str(i) for i in range(40)],
            "is_poisoned": [i % 7 == 0 for i in range(40)]}
    EmbeddingStore.from_arrays(root / "valid.cfbd", image=image, text=image[::-1], meta=meta, batch_rows=15).close()
    files = sorted(p.relative_to(root / "valid.cfbd") for p in (root / "valid.cfbd").rglob("*")
             if p.is_file() and p.name != ".lock")  # the writer lock file holds no store content
    random.seed(7)
    outcomes = {"opened": 0, "refused": 0}
    unexpected = []
    for i in range(iterations):
        case = root / f"case{i % 4}.cfbd"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(root / "valid.cfbd", case)
        target = case / random.choice(files)
        data = bytearray(target.read_bytes())
        kind = random.choice(["truncate", "flip", "flip-head", "extend", "delete"])
        if kind == "truncate":
            data = data[:random.randrange(len(data))]
        elif kind in ("flip", "flip-head"):
            span = min(len(data), 64) if kind == "flip-head" else len(data)
            for _ in range(random.randint(1, 4)):
                data[random.randrange(span)] ^= random.randint(1, 255)
        elif kind == "extend":
            data += bytes(random.randrange(1, 5000))
        if kind == "delete":
            target.unlink()
        else:
            target.write_bytes(bytes(data))
        print(i, kind, target.name, flush=True)
        try:
            with EmbeddingStore.open(case, mode="a" if i % 3 == 0 else "r") as store:
                total = float(store.image.astype(np.float32).sum()) + float(store.text.astype(np.float32).sum())
                rows = sum(len(c) for c in store.iter_chunks(rows=7))
                assert rows == len(store) and store.meta.num_rows == len(store)
                store.info, store.health(), total
            outcomes["opened"] += 1
        except (StoreFormatError, OSError):
            outcomes["refused"] += 1
        except Exception as exc:
            unexpected.append(f"{i} {kind} {target.name}: {type(exc).__name__}: {exc}")
    print(json.dumps({"outcomes": outcomes, "unexpected": unexpected}))
""")


def test_fuzzed_stores_never_crash(tmp_path):
    iterations = 320
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), str(iterations)], capture_output=True, text=True,
                          timeout=300)
    last_case = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else ["(none)"]
    assert proc.returncode == 0, f"fuzz process died (code {proc.returncode}) after case {last_case}: {proc.stderr[-2000:]}"
    result = json.loads(last_case[0])
    assert result["unexpected"] == []
    assert sum(result["outcomes"].values()) == iterations
    assert result["outcomes"]["opened"] > 0 and result["outcomes"]["refused"] > 0
