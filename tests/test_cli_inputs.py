"""The CLI on hostile files: every subcommand answers bad input with a message and exit 2, never a traceback."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optadvisor.advisor.cli import main

# (subcommand argv before the file, the file's suffix)
FILE_INPUTS = [
    (["--profile"], ".yaml"),
    (["--task", "regression", "--extra-rules"], ".yaml"),
    (["rules", "check"], ".yaml"),
    (["profile", "--target", "y"], ".csv"),
    (["diagnose"], ".json"),
    (["diagnose"], ".csv"),
    (["profile"], ".npz"),
    (["profile"], ".pt"),
]

HOSTILE = [
    b"1: 2\ntask: regression\n",                                 # a non-string key
    b"\xff\xfetask: regression\n",                               # not UTF-8
    b"[" * 5000 + b"]" * 5000,                                   # deep nesting (RecursionError before)
    b"{" * 100000,
    b'[{"step": 1e400, "train_loss": 1}]',                       # int(inf): OverflowError before
    b'[{"step": ' + b"9" * 5000 + b"}]",                          # over int's digit limit
    b"a,b,y\n1,2,3\n4,5\n",                                      # a short row
    b"a,b,y\n1,2\x00,3\n",                                       # a NUL byte
    b"y\n" + b"1\n" * 3,
    b"a: &a [x, x]\nb: [*a, *a]\n",                              # aliases
    b"task: regression\ntask: classification\n",                 # a duplicate key
    b"rules:\n- id: x\n  priority: " + b"9" * 5000 + b"\n",
    b"step,train_loss\n1e400,1\n",
    b"step,train_loss\nx,1\n",
    b"[1, 2, 3]",
    b"null",
    b"",
    b"PK\x03\x04" + b"\x00" * 40,                                # a damaged zip (npz, pt)
    b"\x80\x02}q\x00.",                                           # a pickle
]


def _run(tmp_path, capsys, argv, suffix, content: bytes) -> tuple[int, str]:
    path = tmp_path / f"input{suffix}"
    path.write_bytes(content)
    if argv[0] == "profile":
        args = ["profile", str(path), *argv[1:]]
    else:
        args = [*argv, str(path)]
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("argv,suffix", FILE_INPUTS)
@pytest.mark.parametrize("content", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_files_get_exit_2_and_a_message(tmp_path, capsys, argv, suffix, content):
    rc, err = _run(tmp_path, capsys, argv, suffix, content)
    assert rc in (0, 2)
    assert (rc == 2) == bool(err.strip()), (rc, err)  # an error message means exit 2; exit 0 prints none
    if rc == 2:
        assert err.startswith("advise: error: ") and "Traceback" not in err
        assert "input" in err  # the message names the file


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"null", b"", b"- a\n- b\n", b"42\n"])
def test_a_facts_file_that_is_not_a_mapping_is_exit_2(tmp_path, capsys, content):
    rc, err = _run(tmp_path, capsys, ["--profile"], ".yaml", content)
    assert rc == 2 and err.startswith("advise: error: ") and "input.yaml" in err


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_csv_delimiters_are_sniffed(tmp_path, capsys, sep):
    """A semicolon- (tab-, pipe-) separated table was read as one column named 'sqft;rooms;age;price'."""
    path = tmp_path / "houses.csv"
    rows = ["sqft,rooms,age,price", "100,3,10,200", "150,4,5,300", "80,2,20,150", "120,3,8,250"]
    path.write_text("\n".join(r.replace(",", sep) for r in rows) + "\n")
    assert main(["profile", str(path), "--target", "price"]) == 0
    assert "n_features: 3 features per example" in capsys.readouterr().out


def test_a_header_split_by_no_clear_delimiter_is_refused(tmp_path, capsys):
    path = tmp_path / "odd.csv"
    path.write_text("a;b;y\n1;2\n3\n")
    assert main(["profile", str(path), "--target", "y"]) == 2
    assert "contains ';'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,suffix", FILE_INPUTS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b":", b",", b"\n", b"- ", b"&a ", b"*a", b"step", b"y",
                              b"task", b"1e400", b"\"", b"'", b"\xff", b"9" * 80, b"regression", b"  "]),
             max_size=80).map(b"".join)))
def test_fuzzed_files_never_crash_the_cli(tmp_path, capsys, argv, suffix, content):
    rc, err = _run(tmp_path, capsys, argv, suffix, content)
    assert rc in (0, 2), err
    assert "Traceback" not in err


def test_specific_messages(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, ["--profile"], ".yaml", b"1: 2\n")
    assert rc == 2 and "fact names must be strings (got 1)" in err
    rc, err = _run(tmp_path, capsys, ["diagnose"], ".json", b'[{"step": 1e400, "train_loss": 1}]')
    assert rc == 2 and "record 1: step must be a finite integer" in err
    rc, err = _run(tmp_path, capsys, ["diagnose"], ".json", b"[" * 100000)
    assert rc == 2 and "nested too deeply" in err
    rc, err = _run(tmp_path, capsys, ["profile", "--target", "y"], ".csv", b"a,b,y\n1,2,3\n4,5\n")
    assert rc == 2 and "input.csv:3: this row has 2 cells, the header has 3" in err
    rc, err = _run(tmp_path, capsys, ["--task", "regression", "--extra-rules"], ".yaml", b"\xffrules: []\n")
    assert rc == 2 and "input.yaml:1: rule file is not UTF-8 text" in err


def test_no_arguments_is_an_error_not_help(capsys):
    assert main([]) == 2
    assert "give --task" in capsys.readouterr().err


def test_json_and_yaml_readers_bound_numbers_and_keys_word_for_word():
    """The readers' own refusals, exactly (the CLI test above sees only the exit code): a number of at most 64
    characters is read (an integer stays an int, ``1E3`` is a float), one more is refused with where it is;
    a JSON duplicate key and malformed JSON name the file (and the line)."""
    from optadvisor.advisor._yaml import InputError, load_json, load_yaml

    n64, f64 = "9" * 64, "1." + "5" * 62
    got = load_json(f"[{n64}, {f64}, 1E3, 7, -2.5e-1]", "h.json")
    assert got == [int(n64), float(f64), 1000.0, 7, -0.25]
    assert [type(v) for v in got] == [int, float, float, int, float]
    for text, message in [
        (f"[1, {n64}9]", "h.json: a number of 65 characters (at most 64)"),
        (f"[{f64}5]", "h.json: a number of 65 characters (at most 64)"),
        ('{"a": 1, "b": {"a": 2}, "a": 3}', "h.json: duplicate key 'a' in one JSON object"),
        ("[1,\n", "h.json:2: malformed JSON: Expecting value"),
    ]:
        with pytest.raises(InputError) as info:
            load_json(text, "h.json")
        assert str(info.value) == message
    assert load_yaml("a: " + "[" * 63 + "]" * 63, "r.yaml")[0]["a"] is not None  # 64 levels with the mapping
    for text, message in [
        ("a: " + "[" * 64 + "]" * 64, "r.yaml:1: nested more than 64 levels deep"),
        ("a: &x [1]\nb: *x\n", "r.yaml:2: YAML aliases (*x) are not allowed: write the value out (an alias can "
                                 "make a small file expand without bound)"),
    ]:
        with pytest.raises(InputError) as info:
            load_yaml(text, "r.yaml")
        assert str(info.value) == message
    data, _ = load_yaml(f"a: {n64}\nb: {f64}\n", "r.yaml")
    assert data == {"a": int(n64), "b": float(f64)} and type(data["a"]) is int
    for text, message in [
        (f"a: 1\nb: {n64}9\n", f"r.yaml:2: a number of 65 characters (at most 64): {'9' * 20}..."),
        (f"a: 1\nb: [1, {f64}5]\n", "r.yaml:2: a number of 65 characters (at most 64): 1.555555555555555555..."),
    ]:
        with pytest.raises(InputError) as info:
            load_yaml(text, "r.yaml")
        assert str(info.value) == message


def test_read_text_and_malformed_yaml_say_what_and_where(tmp_path):
    """A file of exactly 4 MiB is read, one byte more is refused; a byte that is not UTF-8 is named with its line
    and offset; an unreadable path says why; malformed YAML and a control character name their line."""
    from optadvisor.advisor._yaml import MAX_BYTES, InputError, load_yaml, read_text

    path = tmp_path / "r.yaml"
    path.write_bytes(b"a" * MAX_BYTES)
    assert len(read_text(path, "rule file")) == MAX_BYTES
    for content, message in [(b"a" * (MAX_BYTES + 1), f"{path}: rule file larger than 4 MiB"),
                             (b"a: 1\nb: \xff\n", f"{path}:2: rule file is not UTF-8 text (byte 0xff at offset 8)")]:
        path.write_bytes(content)
        with pytest.raises(InputError) as info:
            read_text(path, "rule file")
        assert str(info.value) == message
    with pytest.raises(InputError) as info:
        read_text(tmp_path, "rule file")
    assert str(info.value) == f"{tmp_path}: cannot read rule file: Is a directory"
    for text, message in [("a: 1\nb: [1,\n", "r.yaml:3: malformed YAML: expected the node content, but found "
                                             "'<stream end>'"),
                          ("a: 1\nb: \x07\n", "r.yaml:2: character 0x7 is not allowed in YAML"),
                          ("a: 1\n  b: 2\n", "r.yaml:2: malformed YAML: mapping values are not allowed here")]:
        with pytest.raises(InputError) as info:
            load_yaml(text, "r.yaml")
        assert str(info.value) == message


def test_trial_runs_on_the_users_own_table(tmp_path, capsys):
    """`advise trial DATA --target COL` (it ran the built-in examples only): a semicolon CSV with class names
    and a missing value; the MLP is sized from the data, the split is the examples' protocol."""
    import random

    rng = random.Random(0)
    lines = ["a;b;c;kind"]
    for i in range(80):
        a, b = rng.gauss(0, 1), rng.gauss(0, 1)
        lines.append(f"{a:.3f};{b:.3f};{'' if i == 5 else rng.random():.3};{'yes' if a + b > 0 else 'no'}")
    path = tmp_path / "table.csv"
    path.write_text("\n".join(lines) + "\n")
    argv = ["trial", str(path), "--target", "kind", "--n-trials", "3", "--top-k", "1", "--seeds", "2",
            "--budget-steps", "20", "--storage", str(tmp_path / "t.db")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "winner:" in out and "CrossEntropyLoss" in out
    assert "1 rows with a missing value left out" in err


@pytest.mark.parametrize("argv, message", [
    (["--n-trials", "3"], "--target must name the target column"),
    (["--target", "kind", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1 (got 1.5)"),
    (["--target", "nope"], "--target must name one of the columns"),
])
def test_trial_on_a_table_refuses_bad_arguments(tmp_path, capsys, argv, message):
    path = tmp_path / "t.csv"
    path.write_text("a,kind\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    assert main(["trial", str(path), *argv]) == 2
    assert message in capsys.readouterr().err
