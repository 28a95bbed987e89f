"""labelImg VOC XML and mask-derived boxes (avs_dist.data.boxes)."""
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest

from avs_dist.data.boxes import (BoxError, box_from_mask, boxes_for_video, parse_voc_xml, write_voc_xml,
                                 xml_candidates)

H, W = 48, 64

LABELIMG = """<annotation>
\t<folder>-abc_def12</folder>
\t<filename>-abc_def12_1.png</filename>
\t<path>C:/labels/-abc_def12_1.png</path>
\t<source><database>Unknown</database></source>
\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
\t<segmented>0</segmented>
{objects}
</annotation>
"""
OBJ = ("<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
       "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def voc(path, boxes, w=W, h=H):
    objs = "\n".join(OBJ.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, (a, b, c, d) in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LABELIMG.format(w=w, h=h, objects=objs))
    return path


def rect_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def s4_record(name="-abc_def12", split="train", category="dog_barking"):
    return SimpleNamespace(subset="s4", name=name, split=split, category=category)


def test_voc_is_one_based_inclusive(tmp_path):
    objs, hw = parse_voc_xml(voc(tmp_path / "a.xml", [("dog", (11, 21, 50, 40))]))
    assert hw == (H, W)
    assert objs == [{"name": "dog", "box": (10.0, 20.0, 50.0, 40.0)}]
    # a box covering the whole image in VOC terms is the full frame in ours
    objs, _ = parse_voc_xml(voc(tmp_path / "b.xml", [("dog", (1, 1, W, H))]))
    assert objs[0]["box"] == (0.0, 0.0, float(W), float(H))


def test_zero_based_border_is_clamped_but_far_outside_is_an_error(tmp_path):
    objs, _ = parse_voc_xml(voc(tmp_path / "edge.xml", [("dog", (0, 0, 10, 10))]))
    assert objs[0]["box"] == (0.0, 0.0, 10.0, 10.0)
    with pytest.raises(BoxError, match="outside.xml.*outside the 64x48 image"):
        parse_voc_xml(voc(tmp_path / "outside.xml", [("dog", (5, 5, W + 20, 10))]))
    with pytest.raises(BoxError, match="empty.xml.*empty box"):
        parse_voc_xml(voc(tmp_path / "empty.xml", [("dog", (30, 5, 20, 10))]))


def test_unparsable_and_incomplete_xml(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<annotation><size><width>3</width></annotation")
    with pytest.raises(BoxError, match="broken.xml.*unparsable"):
        parse_voc_xml(bad)
    nobox = tmp_path / "nobox.xml"
    nobox.write_text(LABELIMG.format(w=W, h=H, objects="<object><name>x</name><bndbox><xmin>1</xmin>"
                                                       "<ymin>1</ymin><xmax>4</xmax></bndbox></object>"))
    with pytest.raises(BoxError, match="nobox.xml.*ymax"):
        parse_voc_xml(nobox)
    nosize = tmp_path / "nosize.xml"
    nosize.write_text("<annotation><object/></annotation>")
    with pytest.raises(BoxError, match="nosize.xml.*size"):
        parse_voc_xml(nosize)
    text = tmp_path / "text.xml"
    text.write_text(LABELIMG.format(w="wide", h=H, objects=""))
    with pytest.raises(BoxError, match="text.xml.*'wide'"):
        parse_voc_xml(text)
    with pytest.raises(BoxError, match="absent.xml"):
        parse_voc_xml(tmp_path / "absent.xml")


def test_write_voc_xml_is_labelimg_style_and_round_trips(tmp_path):
    p = tmp_path / "out" / "v_3.xml"
    objects = [{"name": "cat_meowing", "box": (2, 3, 20, 30)}, {"name": "dog_barking", "box": (0, 0, W, H)}]
    write_voc_xml(p, "v.mp4_3.png", W, H, objects, folder="v", image_path="Multi-sources/v.mp4_3.png")
    root = ET.parse(p).getroot()
    assert root.findtext("folder") == "v" and root.findtext("filename") == "v.mp4_3.png"
    assert root.findtext("source/database") == "Unknown" and root.findtext("segmented") == "0"
    assert root.findtext("size/depth") == "3"
    o = root.findall("object")[0]
    assert o.findtext("pose") == "Unspecified" and o.findtext("truncated") == "0" and o.findtext("difficult") == "0"
    assert [o.findtext(f"bndbox/{t}") for t in ("xmin", "ymin", "xmax", "ymax")] == ["3", "4", "20", "30"]
    parsed, hw = parse_voc_xml(p)
    assert hw == (H, W)
    assert [(d["name"], d["box"]) for d in parsed] == [(d["name"], tuple(map(float, d["box"]))) for d in objects]
    with pytest.raises(BoxError, match="bad.xml"):
        write_voc_xml(tmp_path / "bad.xml", "f.png", W, H, [{"name": "x", "box": (0, 0, W + 1, 5)}])


def test_box_from_mask():
    assert box_from_mask(np.zeros((H, W), np.uint8)) is None
    assert box_from_mask(rect_mask(5, 7, 9, 30)) == (5.0, 7.0, 9.0, 30.0)
    m = np.zeros((H, W), np.uint8)
    m[0, W - 1] = 255
    m[H - 1, 0] = 1
    assert box_from_mask(m) == (0.0, 0.0, float(W), float(H))


def test_rules_mask_nearest_and_ties(tmp_path):
    rec = s4_record()
    masks = {1: rect_mask(5, 5, 15, 15), 3: rect_mask(30, 20, 40, 30)}
    boxes, src = boxes_for_video(rec, (H, W), masks, xml_dir=None)
    assert boxes.dtype == np.float32 and boxes.shape == (5, 4)
    assert src == ["nearest_mask", "mask", "nearest_mask", "mask", "nearest_mask"]
    assert boxes[0].tolist() == [5, 5, 15, 15]  # frame 1's nearest is frame 2
    assert boxes[2].tolist() == [5, 5, 15, 15]  # frames 2 and 4 are equally near: the earlier wins
    assert boxes[4].tolist() == [30, 20, 40, 30]


def test_s4_train_single_mask_and_empty_masks(tmp_path):
    rec = s4_record()
    boxes, src = boxes_for_video(rec, (H, W), {0: rect_mask(1, 2, 3, 4)}, xml_dir=tmp_path)
    assert src == ["mask"] + ["nearest_mask"] * 4
    assert np.all(boxes == np.array([1, 2, 3, 4], np.float32))
    # an empty mask has no box: fall back to another frame's mask, or the full frame
    boxes, src = boxes_for_video(rec, (H, W), {0: np.zeros((H, W)), 2: rect_mask(8, 8, 9, 9)}, None)
    assert src[0] == "nearest_mask" and boxes[0].tolist() == [8, 8, 9, 9]
    boxes, src = boxes_for_video(rec, (H, W), {k: np.zeros((H, W)) for k in range(5)}, None)
    assert src == ["full_frame"] * 5 and np.all(boxes == np.array([0, 0, W, H], np.float32))


def test_xml_wins_and_union_of_objects(tmp_path):
    rec = s4_record()
    voc(tmp_path / rec.name / f"{rec.name}_2.xml", [("dog", (3, 4, 10, 12)), ("cat", (20, 2, 30, 8))])
    voc(tmp_path / f"{rec.name}_5.xml", [("dog", (1, 1, 5, 5))])  # flat layout
    boxes, src = boxes_for_video(rec, (H, W), {0: rect_mask(0, 0, 2, 2), 1: rect_mask(40, 40, 41, 41)}, tmp_path)
    assert src == ["mask", "xml", "nearest_mask", "nearest_mask", "xml"]
    assert boxes[1].tolist() == [2, 1, 30, 12]  # union of both objects, 0-based
    assert boxes[4].tolist() == [0, 0, 5, 5]
    assert boxes[2].tolist() == [40, 40, 41, 41]  # nearest *mask* (frame 2), not the XML


def test_xml_split_category_layout_and_ms3_names(tmp_path):
    rec = s4_record(split="val", category="helicopter")
    voc(tmp_path / "val" / "helicopter" / rec.name / f"{rec.name}_1.xml", [("h", (2, 2, 4, 4))])
    voc(tmp_path / "val" / "helicopter" / f"{rec.name}_3.xml", [("h", (2, 2, 6, 6))])
    _, src = boxes_for_video(rec, (H, W), {}, tmp_path)
    assert src == ["xml", "full_frame", "xml", "full_frame", "full_frame"]
    ms3 = SimpleNamespace(subset="ms3", name="_x-y", split="test", category=None)
    voc(tmp_path / "ms3" / "_x-y" / "_x-y.mp4_2.xml", [("a", (2, 2, 4, 4))])
    voc(tmp_path / "ms3" / "test" / "_x-y_4.xml", [("a", (2, 2, 4, 4))])
    _, src = boxes_for_video(ms3, [(H, W)] * 5, {}, tmp_path / "ms3")
    assert src == ["full_frame", "xml", "full_frame", "xml", "full_frame"]
    assert tmp_path / "ms3" / "_x-y" / "_x-y_1.xml" == xml_candidates(ms3, 1, tmp_path / "ms3")[0]


def test_xml_errors_propagate_with_path(tmp_path):
    rec = s4_record()
    voc(tmp_path / rec.name / f"{rec.name}_1.xml", [("d", (1, 1, 5, 5))], w=224, h=224)
    with pytest.raises(BoxError, match=f"{rec.name}_1.xml.*224x224.*64x48"):
        boxes_for_video(rec, (H, W), {}, tmp_path)
    bad = tmp_path / rec.name / f"{rec.name}_1.xml"
    bad.write_text("<annotation>")
    with pytest.raises(BoxError, match="unparsable"):
        boxes_for_video(rec, (H, W), {}, tmp_path)
    # labelImg saves frames without boxes too: such a file defers to the mask
    bad.write_text(LABELIMG.format(w=W, h=H, objects=""))
    _, src = boxes_for_video(rec, (H, W), {0: rect_mask(1, 1, 2, 2)}, tmp_path)
    assert src[0] == "mask"
    with pytest.raises(BoxError, match="frame 1 is 10x10"):
        boxes_for_video(rec, (H, W), {0: np.ones((10, 10))}, None)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_xml_with_bom_crlf_and_float_corners(tmp_path, encoding):
    """What other annotation tools and editors write: a byte-order mark, CRLF, float corners."""
    text = ('<?xml version="1.0" encoding="{}"?>\r\n'.format("utf-16" if encoding == "utf-16" else "utf-8")
            + LABELIMG.format(w=W, h=H, objects=OBJ.format(name="dog", x0=" 11.5", y0="21.0\r\n", x1=50.25, y1=40))
            .replace("\n", "\r\n"))
    path = tmp_path / "a.xml"
    path.write_bytes(text.encode(encoding))
    objs, hw = parse_voc_xml(path)
    assert hw == (H, W) and objs[0]["box"] == (10.5, 20.0, 50.25, 40.0)


@pytest.mark.parametrize("field, value", [("x0", "nan"), ("x1", "inf"), ("y0", "-nan"), ("w", "nan")])
def test_non_finite_numbers_are_named_errors(tmp_path, field, value):
    # float() reads "nan" / "inf"; a NaN corner used to slip through every range check
    box = dict(x0=11, y0=21, x1=50, y1=40)
    size = dict(w=W, h=H)
    (box if field in box else size)[field] = value
    path = tmp_path / "nan.xml"
    path.write_text(LABELIMG.format(**size, objects=OBJ.format(name="dog", **box)))
    with pytest.raises(BoxError, match=f"nan.xml: <.*> is '{value}', not a finite number"):
        parse_voc_xml(path)
