"""Curated remote-sensing knowledge table: synonyms and overhead-view descriptions per class.

DGL-RSIS enriches the class text of local alignment with remote-sensing knowledge (its
§"RS knowledge" role; the paper's own table is not public). Ours covers the classes of the
benchmarks drseg evaluates on (iSAID's 15, RRSIS-D's 20, the land-cover classes of LoveDA,
Potsdam/Vaihingen, OpenEarthMap, UAVid) with what a class looks like *from above*: shape,
colour, texture and typical context, which is what a crop of an aerial image shows.

A user's class name is looked up by its canonical name or any synonym (case-insensitive,
singular or plural), so ``house`` finds ``building``; user synonyms are kept in front of the
table's. Pure Python: the parser reads its nouns from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Knowledge:
    """One class: its canonical name, other names, and sentences describing it from above."""

    name: str
    synonyms: tuple[str, ...]
    descriptions: tuple[str, ...]


def _k(name: str, synonyms: str, *descriptions: str) -> Knowledge:
    syn = tuple(s.strip() for s in synonyms.split(",") if s.strip())
    return Knowledge(name, syn, tuple(descriptions))


#: The table. Descriptions are written for overhead imagery; keep them short (CLIP's 77 tokens).
KNOWLEDGE: tuple[Knowledge, ...] = (
    # iSAID / DOTA objects
    _k(
        "airplane",
        "plane, aircraft, airliner, jet",
        "an aircraft seen from above, a cross shape with long wings and a tail",
        "a parked airplane on an apron or runway of an airport",
    ),
    _k(
        "helicopter",
        "chopper",
        "a helicopter seen from above with a round body, a tail boom and rotor blades",
    ),
    _k(
        "ship",
        "boat, vessel, yacht, cargo ship",
        "an elongated pointed hull on water, often beside a dock",
        "a boat seen from above with a wake on the water",
    ),
    _k(
        "storage tank",
        "oil tank, tank, silo, fuel tank",
        "a round white or grey cylindrical tank seen from above, often in groups",
        "circular storage tanks in an industrial area or refinery",
    ),
    _k(
        "baseball field",
        "baseball diamond, baseball court",
        "a fan-shaped field with a diamond of brown dirt and green grass",
    ),
    _k(
        "tennis court",
        "tennis field",
        "a small rectangular court with white lines, green, blue or red surface",
    ),
    _k(
        "basketball court",
        "basketball field",
        "a rectangular hard court with painted lines and a circle in the middle",
    ),
    _k(
        "ground track field",
        "running track, athletic track, track field, stadium track",
        "an oval running track, usually red, around a green sports field",
    ),
    _k(
        "soccer field",
        "soccer ball field, football field, football pitch, soccer pitch",
        "a rectangular green grass pitch with white lines and goals at both ends",
    ),
    _k(
        "swimming pool",
        "pool",
        "a small bright blue rectangle of water next to houses or in a park",
    ),
    _k(
        "roundabout",
        "traffic circle, rotary",
        "a circular road junction with a round island in the middle",
    ),
    _k(
        "harbor",
        "harbour, port, dock, pier, wharf, marina",
        "piers and docks along a coastline where ships are moored",
    ),
    _k(
        "bridge",
        "viaduct",
        "a long narrow road or railway crossing over water or a valley",
    ),
    _k(
        "large vehicle",
        "truck, lorry, bus, trailer",
        "a long rectangular truck or bus on a road or in a parking lot",
    ),
    _k(
        "small vehicle",
        "car, automobile, van",
        "a small rectangular car seen from above on a road or in a parking lot",
    ),
    _k(
        "vehicle",
        "cars, trucks, motor vehicle",
        "cars and trucks seen from above on roads and parking lots",
    ),
    # RRSIS-D / DIOR categories
    _k(
        "airport",
        "airfield, aerodrome",
        "runways, taxiways and terminal buildings with parked airplanes",
    ),
    _k("chimney", "smokestack, stack", "a tall chimney seen from above with its long shadow"),
    _k("dam", "reservoir dam, weir", "a thick wall across a river holding back a reservoir"),
    _k(
        "expressway service area",
        "service area, rest area",
        "a parking area with buildings beside an expressway",
    ),
    _k(
        "expressway toll station",
        "toll station, toll gate, toll booth",
        "a row of toll booths under a roof across a wide expressway",
    ),
    _k("golf field", "golf course", "smooth green fairways with sand bunkers and small ponds"),
    _k(
        "overpass",
        "flyover, interchange",
        "elevated roads crossing above other roads, curved ramps",
    ),
    _k(
        "stadium",
        "arena, sports stadium",
        "a large oval or round stadium with stands around a sports field",
    ),
    _k(
        "train station",
        "railway station, station",
        "a long station building beside parallel railway tracks and platforms",
    ),
    _k("windmill", "wind turbine, turbine", "a wind turbine with three long blades and a shadow"),
    # land cover
    _k(
        "building",
        "house, roof, rooftop, residential building, structure",
        "roofs of houses and buildings seen from above with sharp straight edges",
    ),
    _k(
        "road",
        "street, highway, expressway, asphalt road",
        "a long grey asphalt road or street, sometimes with lane markings",
    ),
    _k(
        "water",
        "water body, sea, ocean, pond",
        "a smooth dark blue or green water surface",
    ),
    _k("river", "stream, canal, waterway", "a long winding band of water through the land"),
    _k("lake", "reservoir", "a large body of still water surrounded by land"),
    _k(
        "tree",
        "trees, forest, woodland, tree canopy",
        "dense dark green tree crowns with rough texture",
    ),
    _k(
        "low vegetation",
        "grass, grassland, lawn, meadow, vegetation, shrub",
        "low green grass and shrubs with smooth texture",
    ),
    _k(
        "agriculture",
        "farmland, cropland, field, farm, crop field, paddy",
        "regular patches of farmland and crop fields in green or brown",
    ),
    _k(
        "barren",
        "bare land, bare soil, bareland, sand, desert, wasteland",
        "bare brown or beige soil without vegetation",
    ),
    _k(
        "parking lot",
        "parking, car park, parking area",
        "a paved area with rows of parking spaces and parked cars",
    ),
    _k(
        "railway",
        "railroad, rail, train track, tracks",
        "parallel railway tracks with gravel beds",
    ),
    _k("impervious surface", "pavement, paved area, concrete", "grey paved concrete or asphalt"),
    _k("clutter", "clutter background", "miscellaneous objects and background"),
)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("-", " ").replace("_", " ").split())


def singular(word: str) -> str:
    """A plain-English singular of a (last) word: ships → ship, batteries → battery."""
    irregular = {"people": "person", "men": "man", "women": "woman", "children": "child"}
    if word in irregular:
        return irregular[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def singular_phrase(phrase: str) -> str:
    """The phrase with its last word made singular (storage tanks → storage tank)."""
    words = _norm(phrase).split()
    return " ".join([*words[:-1], singular(words[-1])]) if words else ""


class KnowledgeTable:
    """Lookup of ``Knowledge`` by any of its names; the parser's noun lexicon."""

    def __init__(self, entries: Iterable[Knowledge] = KNOWLEDGE) -> None:
        self.entries = tuple(entries)
        self._by_name: dict[str, Knowledge] = {}
        for entry in self.entries:  # canonical names win over synonyms
            self._by_name.setdefault(_norm(entry.name), entry)
        for entry in self.entries:
            for syn in entry.synonyms:
                self._by_name.setdefault(_norm(syn), entry)

    def lookup(self, name: str) -> Knowledge | None:
        """The entry ``name`` (canonical or synonym, singular or plural) refers to."""
        key = _norm(name)
        return self._by_name.get(key) or self._by_name.get(singular_phrase(key))

    def names(self) -> list[str]:
        """Every name the table knows (canonical and synonyms), normalised."""
        return list(self._by_name)

    def enrich(self, names: Sequence[str], max_synonyms: int = 4) -> tuple[list[str], list[str]]:
        """(names, descriptions) for a class given as ``names`` (user's name + synonyms).

        The user's names come first, then up to ``max_synonyms`` table names that are new;
        descriptions are the matched entries' sentences. A class the table lacks keeps its
        names and gets no description.
        """
        out = [n for n in names if n.strip()]
        seen = {_norm(n) for n in out}
        descriptions: list[str] = []
        for name in list(out):
            entry = self.lookup(name)
            if entry is None:
                continue
            extra = [entry.name, *entry.synonyms]
            added = 0
            for syn in extra:
                if _norm(syn) not in seen and added < max_synonyms:
                    out.append(syn)
                    seen.add(_norm(syn))
                    added += 1
            for d in entry.descriptions:
                if d not in descriptions:
                    descriptions.append(d)
        return out, descriptions


DEFAULT_TABLE = KnowledgeTable()
