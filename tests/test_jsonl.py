"""model.jsonl: one reader for JSON Lines files, every error naming the file and the line."""

import pytest

from model.errors import DataError
from model.jsonl import iter_jsonl, read_jsonl


def write(tmp_path, text: str, name: str = "data.jsonl"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def test_reads_objects_in_order_and_skips_blank_lines(tmp_path):
    p = write(tmp_path, '{"prompt": "a"}\n\n   \n{"prompt": "b", "n": 2}\r\n')
    assert read_jsonl(p, {"prompt": str}) == [{"prompt": "a"}, {"prompt": "b", "n": 2}]
    assert list(iter_jsonl(str(p))) == read_jsonl(p)


def test_bad_json_names_file_and_line(tmp_path):
    p = write(tmp_path, '{"prompt": "a"}\n\n{"prompt": oops}\n')   # the blank line counts
    with pytest.raises(DataError, match=r"data\.jsonl:3: not valid JSON \(Expecting value at column 12\)"):
        read_jsonl(p)


def test_non_object_line(tmp_path):
    p = write(tmp_path, '{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)


def test_missing_key_and_wrong_type(tmp_path):
    p = write(tmp_path, '{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing key 'prompt'$"):
        read_jsonl(p, {"prompt": str})
    p = write(tmp_path, '{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: key 'prompt' must be str, got int"):
        read_jsonl(p, {"prompt": str})
    assert read_jsonl(p, {"prompt": object})[1] == {"prompt": 3}


def test_bad_utf8_names_the_line(tmp_path):
    p = write(tmp_path, b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid UTF-8"):
        read_jsonl(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"dataset not found: .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    p = write(tmp_path, "\n \n", "empty.jsonl")
    assert read_jsonl(p) == []
    with pytest.raises(DataError, match=r"empty\.jsonl: empty dataset"):
        read_jsonl(p, allow_empty=False)


def test_errors_are_raised_only_when_the_bad_line_is_reached(tmp_path):
    p = write(tmp_path, '{"i": 0}\n{"i": 1}\nbroken\n')
    it = iter_jsonl(p)
    assert [next(it)["i"], next(it)["i"]] == [0, 1]
    with pytest.raises(DataError, match=r":3: "):
        next(it)
