"""Pascal VOC format: reading, malformed and hostile XML, round trips, auto-label writes."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from _fileformat_helpers import make_project, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.formats.base import LabelWrite, Provenance, sidecar_path
from connectors.formats.voc import VocFormat
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus


def voc_xml(
    objects: str, size: str = "<size><width>40</width><height>30</height><depth>3</depth></size>"
) -> str:
    return (
        f"<annotation><folder>images</folder><filename>a.png</filename>{size}{objects}</annotation>"
    )


def obj(name: str, x1: object, y1: object, x2: object, y2: object) -> str:
    return f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def voc_project(annotations: Mapping[str, str | bytes], images: tuple[str, ...] = ("a", "b")):
    files: dict[str, bytes | str] = {f"images/{s}.png": png_bytes() for s in images}
    files.update({f"annotations/{s}.xml": x for s, x in annotations.items()})
    return make_project(files, "voc")


def by_id(fmt: VocFormat) -> dict[str, Item]:
    return {i.item_id: i for i in fmt.iter_items()}


def test_reads_boxes_and_size() -> None:
    items = by_id(
        VocFormat(
            voc_project({"a": voc_xml(obj("stop", 1, 2, 30, 25) + obj("light", 0, 0, 40, 30))})
        )
    )
    a = items["a"]
    assert a.status is ItemStatus.LABELED and (a.width, a.height) == (40, 30)
    assert a.annotations == [
        Annotation(label="stop", box=(1, 2, 30, 25)),
        Annotation(label="light", box=(0, 0, 40, 30)),
    ]
    assert items["b"].status is ItemStatus.UNLABELED


def test_missing_or_zero_size_comes_from_the_image_header() -> None:
    zero = "<size><width>0</width><height>0</height></size>"
    items = by_id(
        VocFormat(
            voc_project({"a": voc_xml(obj("x", 1, 1, 5, 5), size=zero), "b": voc_xml("", size="")})
        )
    )
    assert (items["a"].width, items["a"].height) == (40, 30)
    assert (items["b"].width, items["b"].height) == (40, 30) and items["b"].annotations == []


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><object>", "annotations/a.xml:1: malformed XML: "),
        ("<notvoc/>", "annotations/a.xml: expected a VOC <annotation> root element, got <notvoc>"),
        (
            voc_xml(obj("stop", 1, "abc", 30, 25)),
            "annotations/a.xml: object 1 (stop): <ymin> 'abc' is not a number",
        ),
        (
            voc_xml(obj("stop", 1, 2, 30, 25) + obj("stop", 1, 2, 50, 25)),
            "annotations/a.xml: object 2 (stop): box [1.0, 2.0, 50.0, 25.0] ends past the image width 40",
        ),
        (
            voc_xml(obj("stop", 10, 2, 5, 25)),
            "annotations/a.xml: object 1 (stop): box [10.0, 2.0, 5.0, 25.0] has zero or negative size",
        ),
        (
            voc_xml("<object><name>stop</name></object>"),
            "annotations/a.xml: object 1 (stop): missing <bndbox>",
        ),
        (voc_xml("<object><bndbox/></object>"), "annotations/a.xml: object 1: missing <name>"),
    ],
)
def test_bad_xml_is_an_error_item_naming_the_file(xml: str, message: str) -> None:
    items = by_id(VocFormat(voc_project({"a": xml})))
    assert items["a"].error is not None and items["a"].error.startswith(message)
    assert items["b"].error is None


def test_entities_and_dtd_are_refused() -> None:
    bomb = '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><annotation><filename>&lol2;</filename></annotation>'
    external = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation><filename>&x;</filename></annotation>'
    items = by_id(VocFormat(voc_project({"a": bomb, "b": external})))
    for stem in ("a", "b"):
        error = items[stem].error
        assert error is not None and error.startswith(f"annotations/{stem}.xml: refused XML")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-16-be", "latin-1"])
def test_declarations_are_refused_in_any_encoding(encoding: str) -> None:
    """The fast parser's pre-check is bytewise: a DTD in UTF-16, with or without a
    byte-order mark, must still reach the refusing parser."""
    decl = f'<?xml version="1.0" encoding="{encoding.removesuffix("-le").removesuffix("-be")}"?>'
    body = '<!DOCTYPE a [<!ENTITY x "boom">]><annotation><filename>&x;</filename></annotation>'
    data = (decl + body).encode(encoding)
    items = by_id(VocFormat(voc_project({"a": data})))
    error = items["a"].error
    assert error is not None and error.startswith("annotations/a.xml: refused XML"), error


def test_comments_cdata_and_other_encodings_still_read() -> None:
    """Documents that the fast path leaves to the refusing parser (comments, CDATA,
    UTF-16) read as before."""
    plain = voc_xml(obj("stop", 1, 2, 30, 25))
    commented = plain.replace("<folder>", "<!-- made by hand --><folder>")
    cdata = plain.replace("<name>stop</name>", "<name><![CDATA[stop]]></name>")
    latin = voc_xml(obj("café", 1, 2, 30, 25)).replace(
        "<annotation>", '<?xml version="1.0" encoding="latin-1"?><annotation>', 1
    )
    docs: dict[str, bytes] = {
        "a": commented.encode(),
        "b": cdata.encode(),
        "c": plain.encode("utf-16"),
        "d": latin.encode("latin-1"),
    }
    items = by_id(VocFormat(voc_project(docs, images=("a", "b", "c", "d"))))
    for stem in "abc":
        assert items[stem].error is None, items[stem].error
        assert items[stem].annotations == [Annotation(label="stop", box=(1, 2, 30, 25))]
    assert items["d"].annotations == [Annotation(label="café", box=(1, 2, 30, 25))]


def test_annotation_without_image_is_an_error_item() -> None:
    items = by_id(VocFormat(voc_project({"a": voc_xml(""), "nope": voc_xml("")})))
    assert items["nope"].error == "annotations/nope.xml: label file with no image in images/"


coords = st.tuples(st.integers(0, 20), st.integers(0, 15), st.integers(1, 20), st.integers(1, 15))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from(["stop", "speed limit", "x&y"]), coords), max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_round_trip(per_item: list[list[tuple[str, tuple[int, int, int, int]]]]) -> None:
    items = [
        Item(
            item_id=f"i{i}",
            uri=f"images/i{i}.png",
            status=ItemStatus.LABELED,
            annotations=[
                Annotation(label=name, box=(x, y, x + w + 0.5, y + h))
                for name, (x, y, w, h) in specs
            ],
        )
        for i, specs in enumerate(per_item)
    ]
    source = make_project(
        {f"images/i{i}.png": png_bytes(45, 35) for i in range(len(items))}, "voc-src"
    )
    target = make_project({}, "voc-dst")
    VocFormat(target).write_items(items, image_root=source)
    back = by_id(VocFormat(target))
    for item in items:
        got = back[item.item_id]
        assert got.error is None and (got.width, got.height) == (45, 35)
        # VOC holds integer pixels: the half-pixel edge is rounded outward, nothing else moves
        assert [a.label for a in got.annotations] == [a.label for a in item.annotations]
        for g, a in zip(got.annotations, item.annotations, strict=True):
            assert g.box is not None and a.box is not None
            assert g.box == (a.box[0], a.box[1], a.box[2] + 0.5, a.box[3])


def test_written_boxes_are_integer_pixels_that_contain_the_predicted_box() -> None:
    from connectors.formats.voc import integer_box

    assert integer_box((12.3, 4.7, 218.29999999999998, 99.0)) == (12, 4, 219, 99)
    assert integer_box((3.0000000001, 2.9999999999, 7.9999999999, 8.0000000001)) == (3, 3, 8, 8)
    fs = voc_project({})
    fmt = VocFormat(fs)
    item = Item(item_id="a", uri="images/a.png", width=45, height=35)
    xml = fmt.render_label(item, [Annotation(label="stop", box=(1.25, 2.5, 30.75, 20.01))])
    assert b"<xmin>1</xmin>" in xml and b"<ymin>2</ymin>" in xml
    assert b"<xmax>31</xmax>" in xml and b"<ymax>21</ymax>" in xml


def test_write_labels_then_remove() -> None:
    fs = voc_project({"a": voc_xml("")})
    fmt = VocFormat(fs)
    items = by_id(fmt)
    prov = Provenance(run_id="r1", model_version="m", score=0.7)
    ann = [Annotation(label="stop", box=(2.0, 3.0, 12.5, 20.0), score=0.9)]
    outcome = fmt.write_labels(
        [LabelWrite(item=items[s], annotations=ann, provenance=prov) for s in ("a", "b")]
    )
    assert [r.path for r in outcome.records] == ["annotations/b.xml"] and "a" in outcome.refused
    back = by_id(fmt)["b"]
    assert back.status is ItemStatus.AUTO_LABELED and back.source is AnnotationSource.AUTO
    # integer pixels, rounded outward: the written box contains the predicted one
    assert back.annotations == [Annotation(label="stop", box=(2.0, 3.0, 13.0, 20.0))]
    assert "<filename>b.png</filename>" in fs.read_text("annotations/b.xml")
    assert fmt.remove_written(outcome.records) == []
    assert not fs.exists("annotations/b.xml") and not fs.exists(sidecar_path("b"))
    assert fs.exists("annotations/a.xml")
