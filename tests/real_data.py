"""Where the tests find the real photos: ../shared/data/ukbench-dev beside the checkout.

Under CI (CI=true) the data must be there and a missing folder fails the test; elsewhere the
real-photo tests are skipped with the reason.
"""
import os
import shutil
from pathlib import Path

import pytest

UKBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ukbench-dev"


def require_ukbench(*, module_level: bool = False) -> Path:
    """The ukbench-dev folder, or a skip (a failure under CI) when it is missing."""
    if not (UKBENCH / "jpg").is_dir():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"CI: the real test photos are missing at {UKBENCH}")
        pytest.skip(f"real photos not found at {UKBENCH} (../shared beside the checkout)",
                    allow_module_level=module_level)
    return UKBENCH


def copy_ukbench_photos(numbers, folder: Path) -> list[str]:
    """Copy ukbench-dev photos number ``numbers`` into ``folder``; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"ukbench{n:05d}.jpg" for n in numbers]
    for name in names:
        shutil.copyfile(UKBENCH / "jpg" / name, folder / name)
    return names
