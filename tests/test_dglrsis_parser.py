"""DGL-RSIS text side: the rule-based parser on RRSIS-D / RefSegRS-style expressions, the
knowledge table, and the option parsing. Pure Python: no model is built here."""

from __future__ import annotations

import pytest

from drseg_cli.errors import UsageError
from drseg_cli.model.dglrsis.knowledge import DEFAULT_TABLE, singular_phrase
from drseg_cli.model.dglrsis.options import DGLRSISOptions, parse_options
from drseg_cli.model.dglrsis.parser import parse_expression

L, R, T, B, C = "left", "right", "top", "bottom", "center"

# (expression, target, attributes, count, plural, positions, superlatives, relations)
TABLE = [
    ("The gray storage tank on the left", "storage tank", ("gray",), None, False, (L,), (), ()),
    ("the vehicle on the upper right", "vehicle", (), None, False, (T, R), (), ()),
    ("A white plane in the middle of the image", "plane", ("white",), None, False, (C,), (), ()),
    (
        "The ground track field is on the right of the tennis court",
        "ground track field",
        (),
        None,
        False,
        (),
        (),
        (("right_of", ("tennis court",)),),
    ),
    ("a small harbor at the bottom", "harbor", ("small",), None, False, (B,), (), ()),
    ("the ship next to the bridge", "ship", (), None, False, (), (), (("near", ("bridge",)),)),
    ("the two tennis courts at the top", "tennis court", (), 2, True, (T,), (), ()),
    ("all storage tanks in the lower left corner", "storage tank", (), None, True, (B, L), (), ()),
    (
        "the largest building near the river",
        "building",
        (),
        None,
        False,
        (),
        ("largest",),
        (("near", ("river",)),),
    ),
    ("the bridge over the river", "bridge", (), None, False, (), (), (("on", ("river",)),)),
    ("the leftmost airplane", "airplane", (), None, False, (), ("leftmost",), ()),
    (
        "the car parked between the building and the road",
        "car",
        ("parked",),
        None,
        False,
        (),
        (),
        (("between", ("building", "road")),),
    ),
    (
        "Three white ships docked at the harbor",
        "ship",
        ("white", "docked"),
        3,
        True,
        (),
        (),
        (("on", ("harbor",)),),
    ),
    (
        "the basketball court to the left of the baseball field",
        "basketball court",
        (),
        None,
        False,
        (),
        (),
        (("left_of", ("baseball field",)),),
    ),
    ("the round oil tank at the top-left", "oil tank", ("round",), None, False, (T, L), (), ()),
    ("a blue swimming pool", "swimming pool", ("blue",), None, False, (), (), ()),
    ("the smallest windmill", "windmill", (), None, False, (), ("smallest",), ()),
    ("the red running track in the center", "running track", ("red",), None, False, (C,), (), ()),
    ("vehicles on the road", "vehicle", (), None, True, (), (), (("on", ("road",)),)),
    ("buildings along the road", "building", (), None, True, (), (), (("near", ("road",)),)),
    (
        "the overpass above the railway",
        "overpass",
        (),
        None,
        False,
        (),
        (),
        (("above", ("railway",)),),
    ),
    (
        "the dam below the lake",
        "dam",
        (),
        None,
        False,
        (),
        (),
        (("below", ("lake",)),),
    ),
    (
        "the chimney far from the train station",
        "chimney",
        (),
        None,
        False,
        (),
        (),
        (("far_from", ("train station",)),),
    ),
    ("the golf course on the right side", "golf course", (), None, False, (R,), (), ()),
    (
        "the expressway toll station at the bottom",
        "expressway toll station",
        (),
        None,
        False,
        (B,),
        (),
        (),
    ),
    (
        "an expressway service area in the upper part",
        "expressway service area",
        (),
        None,
        False,
        (T,),
        (),
        (),
    ),
    ("the stadium in the lower right", "stadium", (), None, False, (B, R), (), ()),
    ("the airport", "airport", (), None, False, (), (), ()),
    ("a green soccer field", "soccer field", ("green",), None, False, (), (), ()),
    ("the helicopter", "helicopter", (), None, False, (), (), ()),
    ("the roundabout in the middle", "roundabout", (), None, False, (C,), (), ()),
    (
        "5 small vehicles in the parking lot",
        "small vehicle",
        (),
        5,
        True,
        (),
        (),
        (("on", ("parking lot",)),),
    ),
    ("the large vehicle on the left", "large vehicle", (), None, False, (L,), (), ()),
    (
        "the rightmost ship beside the pier",
        "ship",
        (),
        None,
        False,
        (),
        ("rightmost",),
        (("near", ("pier",)),),
    ),
    (
        "the long bridge in the upper part of the image",
        "bridge",
        ("long",),
        None,
        False,
        (T,),
        (),
        (),
    ),
    (
        "next to the harbor is a white ship",
        "ship",
        ("white",),
        None,
        False,
        (),
        (),
        (("near", ("harbor",)),),
    ),
    ("the topmost storage tank", "storage tank", (), None, False, (), ("topmost",), ()),
    ("the biggest baseball diamond", "baseball diamond", (), None, False, (), ("largest",), ()),
    ("several boats on the water", "boat", (), None, True, (), (), (("on", ("water",)),)),
    ("both tennis courts", "tennis court", (), 2, True, (), (), ()),
    (
        "the tree to the south of the house",
        "tree",
        (),
        None,
        False,
        (),
        (),
        (("below", ("house",)),),
    ),
    ("the dark green forest in the west", "forest", ("dark", "green"), None, False, (L,), (), ()),
    (
        "the building which is located close to the ship",
        "building",
        (),
        None,
        False,
        (),
        (),
        (("near", ("ship",)),),
    ),
    # open vocabulary: a noun the lexicon lacks falls back to the content words
    (
        "the red photovoltaic array on the left",
        "photovoltaic array",
        ("red",),
        None,
        False,
        (L,),
        (),
        (),
    ),
    ("the circular wastewater basins", "wastewater basin", ("circular",), None, True, (), (), ()),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 40


@pytest.mark.parametrize(
    ("text", "target", "attrs", "count", "plural", "pos", "sup", "rels"), TABLE
)
def test_parser_splits_nouns_and_modifiers(text, target, attrs, count, plural, pos, sup, rels):
    p = parse_expression(text)
    got = (p.target, p.attributes, p.count, p.plural, p.positions, p.superlatives)
    assert got == (target, attrs, count, plural, pos, sup)
    assert tuple((r.kind, r.anchors) for r in p.relations) == rels
    assert p.nouns[0] == target  # the local class nouns: target first, then the anchors
    assert set(p.anchors) <= set(p.nouns)


def test_extra_nouns_are_recognised():
    """A run's class names join the lexicon: the anchor of an unknown class is found."""
    p = parse_expression("the ship next to the floating crane barge", extra_nouns=["crane barge"])
    assert p.target == "ship"
    assert p.relations[0].kind == "near" and p.relations[0].anchors == ("crane barge",)
    plain = parse_expression("the ship next to the floating crane barge")
    assert plain.relations[0].anchors == ("crane",)  # without it: the lexicon's "crane"


def test_knowledge_lookup_and_enrichment():
    assert DEFAULT_TABLE.lookup("houses").name == "building"
    assert DEFAULT_TABLE.lookup("Storage-Tanks").name == "storage tank"
    assert DEFAULT_TABLE.lookup("photovoltaic array") is None
    assert singular_phrase("batteries") == "battery"
    names, descriptions = DEFAULT_TABLE.enrich(["house", "my roof"], max_synonyms=2)
    assert names[:2] == ["house", "my roof"]  # user names (and synonyms) first
    assert names[2:] == ["building", "roof"]  # then ≤ 2 new table names
    assert descriptions and "roof" in descriptions[0]
    assert DEFAULT_TABLE.enrich(["photovoltaic array"]) == (["photovoltaic array"], [])


def test_options_from_key_values():
    o = parse_options(["context_ratio=2", "cam-scales=1,2", "knowledge=false", "proposals=sam"])
    assert (o.context_ratio, o.cam_scales, o.knowledge, o.proposals) == (
        2.0,
        (1.0, 2.0),
        False,
        "sam",
    )
    assert parse_options([]) == DGLRSISOptions()
    for bad, words in (
        (["nope=1"], "unknown option"),
        (["context_ratio"], "KEY=VALUE"),
        (["context_ratio=0.5"], "must be ≥ 1"),
        (["superpixels=x"], "not an integer"),
        (["attenuation=2"], "[0, 1]"),
        (["proposals=magic"], "superpixel, sam"),
        (["knowledge=maybe"], "true or false"),
    ):
        with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_options(bad)
