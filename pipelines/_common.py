"""Shared command-line plumbing of the pipeline scripts: logging, the config file, overrides."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:  # running `python pipelines/x.py` without installing
    sys.path.insert(0, str(REPOSITORY_ROOT))

from retrieval.config import PRESETS, SystemConfig  # noqa: E402


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss.loader", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser, *, extraction: bool = True) -> None:
    """--device, --no-progress, --verbose and, with ``extraction``, --config and its overrides
    (an index always uses the config stored with its codebook directory)."""
    if extraction:
        parser.add_argument("--config", help="YAML file with SystemConfig values (only the keys "
                            "to change; see retrieval/config.py), or a preset: "
                            + ", ".join(PRESETS))
    parser.add_argument("--device", type=device_argument,
                        help="auto | cpu | cuda | cuda:N: where the model runs (default: the config's, "
                        "auto = a GPU when there is one)")
    if extraction:
        parser.add_argument("--max-size", type=int, help="longest image side in pixels")
        parser.add_argument("--scales", type=float, nargs="+", help="pyramid scales, e.g. 1 0.707")
        parser.add_argument("--top-n", type=int, help="local features per image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def device_argument(value: str) -> str:
    """A --device value, checked now: a GPU asked for on a machine without one is a usage error."""
    from imagedata.extraction import resolve_device
    try:
        resolve_device(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def config_from_arguments(args: argparse.Namespace) -> SystemConfig:
    """The config file (or the defaults) with the command-line overrides applied."""
    config = SystemConfig.load(args.config)
    extraction = {name: getattr(args, attribute) for name, attribute in
                  (("max_size", "max_size"), ("scales", "scales"), ("top_n", "top_n"),
                   ("device", "device")) if getattr(args, attribute, None) is not None}
    return config.updated({"extraction": extraction}) if extraction else config


def fail(message: str, code: int = 2) -> int:
    logging.getLogger("pipelines").error(message)
    return code
