"""What the learners in ``algos/`` share: small helpers, kept out of the algorithm files so those read top to bottom."""

from __future__ import annotations

import sys
import warnings


def progress_bar(total: int, desc: str):
    """A rich progress bar (as SB3's ``progress_bar=True``), plain tqdm when not on a terminal."""
    if sys.stderr.isatty():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm.rich is marked experimental
            from tqdm.rich import tqdm

            return tqdm(total=total, desc=desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, mininterval=1.0)
