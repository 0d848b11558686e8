"""Command-line options of the extension (A1111 runs this before parsing its arguments)."""

import argparse


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--anima-dir", type=str, default=None,
        help="folder of anima reference contexts (default: models/anima under the WebUI data dir)",
    )
    parser.add_argument(
        "--anima-dataset-roots", type=str, default=None,
        help="folders (separated by the OS path separator) inside which training dataset directories are allowed "
             "(default: the WebUI data dir)",
    )
    parser.add_argument(
        "--anima-debug-rows", action="store_true",
        help="for tests: record which rows of each UNet call got which kind, served at GET /anima/v1/debug/rows",
    )
