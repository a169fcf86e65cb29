"""ext4 disks through the whole path: capture, change, capture again, and read every point
back through the mount with real tools (cmp, sha256sum, e2fsck, loop mount, qemu-img)."""

from __future__ import annotations

from pathlib import Path

from helpers import (
    RAW_RECORD,
    MiB,
    assert_same_bytes,
    build_tree,
    debugfs_write,
    e2fsck_clean,
    loop_mount,
    make_ext4,
    point_image,
    qemu_identical,
    sha256_file,
    sha256sum,
    sparse_copy,
    tree_checksums,
    write_random,
)

SIZE = 128 * MiB


def check_point(mnt: Path, disk: str, point: str, source: Path, sums: dict, where: Path):
    """Everything the issue asks of a point image: same bytes, clean fs, right files."""
    img = point_image(mnt, disk, point)
    assert img.stat().st_size == source.stat().st_size
    assert_same_bytes(img, source)
    assert sha256sum(img) == sha256_file(source)
    e2fsck_clean(img)
    with loop_mount(img, where) as root:
        assert tree_checksums(root) == sums
    qemu_identical(img, source)


def test_ext4_points_are_exact_through_the_mount(rpfs, mounted, ext4_builder, tmp_path):
    image, tree, sums1 = ext4_builder("vm", seed=1, size=SIZE)
    at_p1 = tmp_path / "vm-at-p1.img"
    sparse_copy(image, at_p1)
    p1 = rpfs.capture("vm", image, "p1")
    assert p1["method"] == "full"
    assert p1["size"] == SIZE
    # Compressible text and sparse free space: far less stored than the disk's size.
    assert p1["bytes_stored"] < 12 * MiB

    # Change files in place with debugfs: replace one, remove one, add a directory+file.
    new_bin = tmp_path / "new.bin"
    write_random(new_bin, 2 * MiB + 100, seed=42)
    new_txt = tmp_path / "new.txt"
    new_txt.write_text("changed configuration\n" * 500)
    debugfs_write(
        image,
        [
            "rm data/copy-of-random.bin",
            "rm etc/config.ini",
            f"write {new_txt} etc/config.ini",
            "mkdir srv",
            f"write {new_bin} srv/new.bin",
        ],
    )
    sums2 = dict(sums1)
    del sums2["data/copy-of-random.bin"]
    sums2["etc/config.ini"] = sha256_file(new_txt)
    sums2["srv/new.bin"] = sha256_file(new_bin)
    at_p2 = tmp_path / "vm-at-p2.img"
    sparse_copy(image, at_p2)
    p2 = rpfs.capture("vm", image, "p2")
    assert p2["method"] == "incremental"
    # ~33 blocks of new file data plus a few metadata blocks, out of 2048.
    assert 33 <= p2["blocks_written"] <= 80, p2
    assert p2["bytes_stored"] <= 2 * MiB + 40 * RAW_RECORD, p2

    # Rebuild the image from a modified folder, same size: almost every block may move.
    (tree / "data" / "small.bin").unlink()
    (tree / "home" / "user" / "notes.md").write_text("rewritten\n" * 1000)
    (tree / "opt").mkdir()
    write_random(tree / "opt" / "tool.bin", 700_000, seed=5)
    make_ext4(tree, image, SIZE)
    sums3 = tree_checksums(tree)
    p3 = rpfs.capture("vm", image, "p3")
    assert p3["method"] == "incremental"

    # Every point reads back exactly as the source was at its capture.
    check_point(mounted, "vm", "p1", at_p1, sums1, tmp_path / "lo1")
    check_point(mounted, "vm", "p2", at_p2, sums2, tmp_path / "lo2")
    check_point(mounted, "vm", "p3", image, sums3, tmp_path / "lo3")
    assert sorted(p.name for p in (mounted / "points" / "vm").iterdir()) == [
        "p1.img",
        "p2.img",
        "p3.img",
    ]


def test_two_ext4_disks_share_nothing_but_chunks(rpfs, mounted, tmp_path):
    """Two disks of different content are kept apart; the same tree dedups across them."""
    sums_a = build_tree(tmp_path / "a", seed=10)
    sums_b = build_tree(tmp_path / "b", seed=11)
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    make_ext4(tmp_path / "a", img_a, 64 * MiB)
    make_ext4(tmp_path / "b", img_b, 96 * MiB)
    rpfs.capture("alpha", img_a, "p")
    rpfs.capture("beta", img_b, "p")
    for disk, img, sums in (("alpha", img_a, sums_a), ("beta", img_b, sums_b)):
        check_point(mounted, disk, "p", img, sums, tmp_path / f"lo-{disk}")
