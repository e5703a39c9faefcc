import pytest

from drseg_cli.classes import MAX_CLASSES, ClassSpec, parse_classes
from drseg_cli.errors import UsageError


def test_comma_list_with_synonyms():
    classes = parse_classes(" road , building:house|roof ,  open   water ")
    assert [c.name for c in classes] == ["road", "building", "open water"]
    assert classes[1] == ClassSpec("building", ("house", "roof"))
    assert classes[1].prompt_names == ("building", "house", "roof")


def test_class_file_with_synonyms_and_comments(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# land cover\nroad\n\nbuilding: house, roof   # urban\nwater\n", "utf-8")
    classes = parse_classes(str(f))
    assert [c.name for c in classes] == ["road", "building", "water"]
    assert classes[1].synonyms == ("house", "roof")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("road,,water", "empty class name"),
        ("", "empty"),
        (" , ", "empty"),
        ("road,Road", "duplicate class name 'Road'"),
        ("road,building:house|", "empty synonym"),
        ("x" * 300, "characters"),
        (",".join(f"c{i}" for i in range(MAX_CLASSES + 1)), "at most 254"),
    ],
)
def test_bad_class_lists_are_rejected(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_classes(spec)


def test_missing_or_empty_class_file(tmp_path):
    with pytest.raises(UsageError, match="class file not found"):
        parse_classes(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", "utf-8")
    with pytest.raises(UsageError, match="no classes"):
        parse_classes(str(empty))
    dup = tmp_path / "dup.txt"
    dup.write_text("road\nwater\nroad\n", "utf-8")
    with pytest.raises(UsageError, match=r"dup.txt:.*duplicate"):
        parse_classes(str(dup))


def test_segearth_ov_class_file_is_read_as_is(tmp_path):
    """SegEarth-OV's configs/cls_*.txt: one class per line, its names comma-separated, the
    first one naming the class (cls_potsdam.txt); drseg's colon lines still work beside them."""
    f = tmp_path / "cls_potsdam.txt"
    f.write_text(
        "road,parking lot\nbuilding\nlow vegetation\ntree\ncar\nclutter,background\n"
        "water: river, lake\n",
        "utf-8",
    )
    classes = parse_classes(str(f))
    assert [c.name for c in classes] == [
        "road",
        "building",
        "low vegetation",
        "tree",
        "car",
        "clutter",
        "water",
    ]
    assert classes[0] == ClassSpec("road", ("parking lot",))
    assert classes[5].prompt_names == ("clutter", "background")
    assert classes[6].synonyms == ("river", "lake")
    f.write_text("road,,parking lot\n", "utf-8")
    with pytest.raises(UsageError, match="empty synonym"):
        parse_classes(str(f))
