"""Labelled subsets of a training folder, named by a text file: the semi-supervised benchmark's
1 % / 10 % of ImageNet (SimCLR's `imagenet_subsets/1percent.txt`, `10percent.txt`), which the
MIRA paper also uses as the k-NN's memory banks (Table 3).

One line per image: a file name (`n01440764_10026.JPEG`; ImageNet's are unique) or a path
relative to the train folder. A line that names no image is an error, not a silent skip:
a subset with missing images is another benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastssl.eval.errors import EvalError
from pipelines.folder import read_text_file

__all__ = ["subset_samples", "read_subset_lines", "match_subset"]


def subset_samples(path: Path, samples: list[tuple[str, int]], root: str) -> list[tuple[str, int]]:
    """The (path, label) pairs of `samples` (a scan of `root`) that the subset file `path` names, in its order."""
    return match_subset(read_subset_lines(path), samples, root)


def read_subset_lines(path: Path) -> list[str]:
    """The image names of a subset file, in order, without blanks, comments or repeats."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise EvalError(f"subset file {str(path)!r} {what}; pass a text file with one image "
                        "per line (e.g. SimCLR's 1percent.txt)")
    names = []
    for raw in read_text_file(path, "subset file", EvalError).splitlines():
        line = raw.split("#", 1)[0].strip().replace("\\", "/")
        if line:
            names.append(line[2:] if line.startswith("./") else line)
    names = list(dict.fromkeys(names))
    if not names:
        raise EvalError(f"subset file {str(path)!r} is empty: it names no image (one file name or "
                        "train-relative path per line)")
    return names


def relative(path: str, root: str) -> str:
    """`path` relative to `root`, '/'-separated. The scan's paths start with `root`, so this is a slice:
    `os.path.relpath` per image takes a minute and more on ImageNet's 1.28M."""
    prefix = os.path.join(root, "")
    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
    return rel.replace(os.sep, "/")


def match_subset(names: list[str], samples: list[tuple[str, int]], root: str) -> list[tuple[str, int]]:
    """The samples the subset names: a line with a '/' is a path relative to `root`, a bare
    file name matches that file in any class folder (ImageNet file names are unique)."""
    by_path = {relative(p, root): (p, y) for p, y in samples}
    by_name: dict[str, list[tuple[str, int]]] = {}
    for p, y in samples:
        by_name.setdefault(os.path.basename(p), []).append((p, y))
    chosen, unmatched, ambiguous = [], [], []
    for name in names:
        hits = [by_path[name]] if name in by_path else ([] if "/" in name else by_name.get(name, []))
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            chosen.append(hits[0])
    if unmatched:
        raise EvalError(f"{len(unmatched)} of {len(names)} subset lines match no image under {root!r}, e.g. "
                        f"{unmatched[:3]}; lines are file names or paths relative to the train folder "
                        "(is --train the folder the list was made for?)")
    if ambiguous:
        raise EvalError(f"{len(ambiguous)} subset lines name a file found in several class folders, e.g. "
                        f"{ambiguous[:3]}; write them as <class>/<file>")
    return chosen
