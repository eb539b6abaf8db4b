"""``DatasetError``: the one error for a missing or malformed dataset, with what to do."""

from __future__ import annotations

import os

PUBLISHED = {
    "cub200": "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    "cars196": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    "sop": "https://cvgl.stanford.edu/projects/lifted_struct/",
    "folder": None,
}

LAYOUTS = {
    "cub200": """\
CUB_200_2011/                      (root)
  images.txt                       <image_id> <path under images/>
  image_class_labels.txt           <image_id> <class_id 1..200>
  classes.txt                      <class_id> <class name>
  images/<class name>/<image>.jpg""",
    "cars196": """\
cars196/                           (root) — either layout A:
  cars_annos.mat                   struct 'annotations' (relative_im_path, bbox_x1, bbox_y1,
                                   bbox_x2, bbox_y2, class 1..196, test), 'class_names'
  car_ims/000001.jpg ...
or layout B (devkit):
  devkit/cars_train_annos.mat      struct 'annotations' (bbox_*, class, fname)
  devkit/cars_meta.mat             'class_names'
  cars_test_annos_withlabels.mat   (here or in devkit/) struct 'annotations' with 'class'
  cars_train/<fname>  cars_test/<fname>""",
    "sop": """\
Stanford_Online_Products/          (root)
  Ebay_train.txt, Ebay_test.txt    header 'image_id class_id super_class_id path',
                                   then one '<int> <int> <int> <path>' line per image
  <category>_final/<image>.JPG""",
    "folder": """\
root/<class name>/<image>          one folder per class (sorted names: first half train,
                                   second half test), images .jpg/.jpeg/.png/.bmp/...""",
}


class DatasetError(RuntimeError):
    """A dataset is missing or malformed. The message names the file (and line), the
    expected layout on disk and where the dataset is published.

    A RuntimeError (not OSError/ValueError): the fix is in the data, not in the call.
    """

    def __init__(
        self,
        dataset: str,
        problem: str | None = None,
        *,
        file: str | os.PathLike | None = None,
        line: int | None = None,
    ) -> None:
        if problem is None:
            # One finished message: how a DataLoader worker's error is re-raised in the
            # main process (``type(error)(message)``) and how pickle rebuilds it. Without
            # this form those become a bare RuntimeError, and ``except DatasetError`` fails.
            self.dataset, self.problem, self.line, self.file = None, dataset, None, None
            super().__init__(dataset)
            return
        self.dataset, self.problem, self.line = dataset, problem, line
        self.file = _printable(os.fspath(file)) if file is not None else None
        problem = _printable(problem)
        where = ""
        if self.file is not None:
            where = f"{self.file}" + (f", line {line}" if line is not None else "") + ": "
        parts = [f"{dataset}: {where}{problem}"]
        if dataset in LAYOUTS:
            parts.append("expected layout:\n" + _indent(LAYOUTS[dataset]))
        if PUBLISHED.get(dataset):
            parts.append(f"the dataset is published at {PUBLISHED[dataset]}")
        super().__init__("\n".join(parts))


def _printable(text: str | bytes) -> str:
    # Non-UTF-8 file names arrive as surrogate escapes (or bytes); a message containing
    # them would itself raise UnicodeEncodeError when printed.
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
