"""The meta CSVs are read as the reference reads them: pandas.read_csv(path, sep=',').

The oracle is pandas itself, called as the reference calls it; our reader differs from it
deliberately only where the reference would mangle a name (NaN / number parsing), and says so.
"""
from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from avs_dist.data.layout import MS3_HEADER, S4_HEADER, LayoutError, read_meta_csv, read_subset
from avs_dist.data.pack import main, pack

QUIET = dict(progress=False, log=lambda *a, **k: None)
S4_CSV = "Single-source/s4_meta_data.csv"
MS3_CSV = "Multi-sources/ms3_meta_data.csv"


def spreadsheet_bytes(text: str) -> bytes:
    """What a spreadsheet's 'CSV UTF-8' export writes: a byte-order mark and CRLF line ends."""
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()


def reference_rows(path, columns) -> list[list[str]]:
    """The reference's reading: pd.read_csv(path, sep=','), then the columns by name."""
    df = pd.read_csv(path, sep=",")
    return [[str(v) for v in row] for row in df[columns].itertuples(index=False, name=None)]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_issue_spreadsheet_saved_csv_packs_identically(roots, s4_shards, tmp_path):
    """Issue 11, case 1: s4_meta_data.csv saved again with a BOM and CRLF. Before: pack
    exited 1 ("header is ['\\ufeffname', ...]"); now it packs, to the same shards."""
    csv = roots / S4_CSV
    csv.write_bytes(spreadsheet_bytes(csv.read_text()) + b"\r\n\r\n")  # and blank lines at the end
    assert list(pd.read_csv(csv, sep=",").columns) == S4_HEADER  # pandas reads four clean columns
    out = tmp_path / "out"
    assert main(["--data-root", str(roots), "--subset", "s4", "--out", str(out), "--crop-size", "32",
                 "--shard-videos", "4", "--workers", "1", "--no-progress"]) == 0
    assert {p.name: _sha(p) for p in out.glob("*.tar")} == {p.name: _sha(p) for p in s4_shards.glob("*.tar")}


def test_both_meta_csvs_read_as_pandas_reads_them(roots, synth_root):
    for subset, rel, header in (("s4", S4_CSV, S4_HEADER), ("ms3", MS3_CSV, MS3_HEADER)):
        want = [(r.name, r.split) for r in read_subset(synth_root, subset)]
        text = (roots / rel).read_text()
        lines = text.splitlines()
        # quoted fields, CR-only line ends, a blank line in the middle, ",,," rows a spreadsheet leaves
        quoted = "\n".join([lines[0]] + ['"' + '","'.join(line.split(",")) + '"' for line in lines[1:]]) + "\n"
        middle = "\n".join(lines[:3] + [""] + lines[3:]) + "\n"
        empty_rows = text + "," * (len(header) - 1) + "\n" + "," * (len(header) - 1) + "\n"
        for variant in (spreadsheet_bytes(text), spreadsheet_bytes(quoted), text.replace("\n", "\r").encode(),
                        middle.encode(), empty_rows.encode()):
            (roots / rel).write_bytes(variant)
            got = [(r.name, r.split) for r in read_subset(roots, subset)]
            assert got == want
            ref = reference_rows(roots / rel, [header[0], "split"])
            assert [tuple(r) for r in ref if r[1] != "nan"] == want  # the reference's split filter drops ",,,"


def _write(tmp_path, text: str | bytes, name="meta.csv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_names_are_literal_text_where_pandas_defaults_would_mangle_them(tmp_path):
    names = ["NA", "nan", "null", "None", "00123", "1e5", "-_wznbUu3DY", "#start"]
    path = _write(tmp_path, "video_id,split\n" + "".join(f"{n},test\n" for n in names))
    assert [row["video_id"] for _, row in read_meta_csv(path, MS3_HEADER)] == names
    # the reference's default parsing turns the first ones into NaN and numbers
    default = pd.read_csv(path, sep=",")["video_id"].tolist()
    assert pd.isna(default[0]) and pd.isna(default[1]) and pd.isna(default[2]) and pd.isna(default[3])
    # a column of digit-only ids would even become integers, leading zeros lost
    digits = _write(tmp_path, "video_id,split\n00123,train\n0456,val\n", "digits.csv")
    assert [r["video_id"] for _, r in read_meta_csv(digits, MS3_HEADER)] == ["00123", "0456"]
    assert pd.read_csv(digits, sep=",")["video_id"].tolist() == [123, 456]


def test_start_is_read_as_pandas_reads_numbers(tmp_path, roots):
    csv = roots / S4_CSV
    lines = csv.read_text().splitlines()
    name, _, cat, split = lines[1].split(",")
    lines[1] = f'{name}," 3.0",{cat},{split}'
    csv.write_text("\n".join(lines) + "\n")
    assert read_subset(roots, "s4")[0].start == 3
    lines[1] = f"{name},3.5,{cat},{split}"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=r"s4_meta_data.csv: row 2: start '3.5' is not a whole number"):
        read_subset(roots, "s4")


BAD = {
    "unclosed_quote": ('name,start,category,split\na,0,dog_barking,train\n"b,1,dog_barking,val\n',
                       r"unparsable CSV \(pandas: .*EOF inside string.*a quote opened on line 3 is never closed"),
    "extra_field_in_a_row": ("name,start,category,split\na,0,dog_barking,train\nb,1,dog_barking,val,x\n",
                             r"unparsable CSV \(pandas: .*Expected 4 fields in line 3, saw 5"),
    "trailing_commas": ("name,start,category,split\na,0,dog_barking,train,\nb,1,dog_barking,val,\n",
                        r"row 2 has 5 fields but the header has 4: pandas then reads the first column as the row index"),
    "missing_field": ("name,start,category,split\na,0,dog_barking,train\nb,1\n", r"row 3: empty 'category' field"),
    "empty_name": ("name,start,category,split\n,0,dog_barking,train\n", r"row 2: empty 'name' field"),
    "bad_split": ("name,start,category,split\na,0,dog_barking,Train\n", r"row 2: split 'Train' is not one of"),
    "semicolons": ("name;start;category;split\na;0;dog_barking;train\n",
                   r"header is \['name;start;category;split'\].*separated by semicolons"),
    "wrong_header": ("video,start,category,split\na,0,dog_barking,train\n", r"header is \['video', 'start'"),
    "empty_file": ("", r"empty file, expected the header name,start,category,split"),
    "utf16": ("name,start,category,split\na,0,dog_barking,train\n".encode("utf-16"), r"UTF-16 text"),
    "latin1": ("name,start,category,split\na,0,dog_barking,train\nb\xe9,1,dog_barking,val\n".encode("latin-1"),
               r"not UTF-8 text: byte 0xe9 at offset 49 \(line 3\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unreadable_csv_is_a_named_error(case, tmp_path):
    text, message = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(LayoutError, match=str(path).replace(".", r"\.") + ": .*" + message):
        read_meta_csv(path, S4_HEADER)


def test_pack_cli_names_the_csv_row(roots, tmp_path, capsys):
    csv = roots / S4_CSV
    csv.write_text(csv.read_text() + "ghost,1,dog_barking\n")
    assert main(["--data-root", str(roots), "--subset", "s4", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert f"{csv}: row 14: empty 'split' field" in capsys.readouterr().err
    with pytest.raises(LayoutError):
        pack(roots, "s4", tmp_path / "o", **QUIET)
