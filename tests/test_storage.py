"""``ProjectFS.resolve``: paths that leave the root are refused, and the check is cheap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.errors import PathEscapeError
from connectors.storage import ProjectFS


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A project root with ``images/a.jpg`` and a folder ``outside`` next to it."""
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    return root, outside


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "s3://b/k", "a/../../x", "C:/x"])
def test_lexical_escapes_are_refused(tree: tuple[Path, Path], rel: str) -> None:
    root, _ = tree
    with pytest.raises(PathEscapeError):
        ProjectFS(str(root)).resolve(rel, item="it")


def test_symlinked_file_outside_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "images" / "b.jpg").symlink_to(outside / "secret.txt")
    fs = ProjectFS(str(root))
    assert fs.resolve("images/a.jpg") == f"{root}/images/a.jpg"
    with pytest.raises(PathEscapeError, match="outside the project root"):
        fs.resolve("images/b.jpg", item="b")


def test_symlinked_folder_outside_is_refused_every_time(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "linked").symlink_to(outside)
    fs = ProjectFS(str(root))
    for _ in range(2):  # a refused folder is not remembered as checked
        with pytest.raises(PathEscapeError, match="symlink"):
            fs.resolve("linked/secret.txt")


def test_symlinks_inside_the_root_are_fine(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "alias").symlink_to(root / "images")
    (root / "images" / "c.jpg").symlink_to(root / "images" / "a.jpg")
    fs = ProjectFS(str(root))
    assert fs.resolve("alias/a.jpg") == f"{root}/alias/a.jpg"
    assert fs.resolve("images/c.jpg") == f"{root}/images/c.jpg"


def test_symlinked_root_is_followed(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    link = tmp_path / "root_link"
    link.symlink_to(root)
    assert ProjectFS(str(link)).resolve("images/a.jpg") == f"{link}/images/a.jpg"


def test_root_and_each_folder_are_resolved_once(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tree
    for i in range(50):
        (root / "images" / f"{i}.jpg").write_bytes(b"x")
    (root / "labels").mkdir()
    fs = ProjectFS(str(root))
    calls: list[str] = []
    real = os.path.realpath

    def counting(path: str, *args: object, **kwargs: object) -> str:
        calls.append(path)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os.path, "realpath", counting)
    for i in range(50):
        fs.resolve(f"images/{i}.jpg")
        fs.resolve(f"labels/{i}.xml")
    # the root once, each of the two folders once; files that are no symlinks need none
    assert sorted(calls) == sorted([str(root), f"{root}/images", f"{root}/labels"])


def test_a_folder_created_later_is_checked_when_it_exists(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    fs = ProjectFS(str(root))
    fs.resolve("later/x.txt")  # does not exist yet: nothing to follow
    (root / "later").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        fs.resolve("later/x.txt")


def test_local_walk_and_listdir_list_what_fsspec_lists(tree: tuple[Path, Path]) -> None:
    """The local fast paths (one ``scandir`` per folder) give fsspec's listing: nested and
    empty folders, a symlink to a folder counted as a file and not followed, a dangling
    symlink, the bookkeeping folder skipped, a missing folder or a file listed as empty."""
    import fsspec

    root, _ = tree
    for rel in ("images/deep/er/c.jpg", "images/b.jpg", ".labeltriage/runs/x.json", "z.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "images" / "empty").mkdir()
    (root / "images" / "link").symlink_to(root / "images" / "deep")
    (root / "images" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    fs = ProjectFS(str(root))

    class ThroughFsspec(ProjectFS):
        is_local = False  # the general path, on the same local files

    slow = ThroughFsspec(str(root))
    assert isinstance(slow.fs, fsspec.implementations.local.LocalFileSystem)
    for rel in (".", "images", "images/deep", "images/link", "missing", "z.txt"):
        assert list(fs.walk_files(rel)) == list(slow.walk_files(rel)), rel
        assert fs.listdir(rel) == slow.listdir(rel), rel
    assert list(fs.walk_files("images")) == [
        "images/a.jpg",
        "images/b.jpg",
        "images/dangling.jpg",
        "images/link",
        "images/deep/er/c.jpg",
    ]
