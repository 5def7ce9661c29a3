"""The documentation against the code: each script's flag table against its parser, the
documented Predictor call run as written, and every link between the pages."""
import argparse
import importlib
import json
import re
import textwrap

import pytest

from conftest import PROJECT, run_command

# Each script's page, with its one flag table (the table whose first header cell is "flag").
FLAG_PAGES = {"train": "docs/train.md", "predict": "docs/predict.md", "serve": "docs/serve.md",
              "export": "docs/export.md", "download_flowers": "docs/download.md",
              "check_data": "docs/check_data.md", "studio": "docs/studio.md"}
PAGES = ["README.md", "benchmarks/README.md", *sorted(set(FLAG_PAGES.values())), "docs/data.md"]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def table_rows(text, first_header):
    """The first cells of the rows of the markdown table whose header starts with first_header."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[index + 2:]:  # past the |---| line
                if not row.startswith("|"):
                    break
                rows.append(row.strip().strip("|").split("|")[0].strip())
            return rows
    return None


def documented_flags(page):
    """{flag or positional name: the row's first cell} of the page's flag table; a cell may
    name several (`--batch_size`, `--workers`), each code span's first word being one."""
    rows = table_rows((PROJECT / page).read_text(), "flag")
    assert rows is not None, f"{page} has no flag table (a table whose first column is 'flag')"
    flags = {}
    for cell in rows:
        spans = re.findall(r"`([^`]+)`", cell)
        assert spans, f"{page}: the flag cell {cell!r} names no flag in `code`"
        for span in spans:
            flags[span.split()[0]] = cell
    return flags


def parser_actions(script):
    """The script's parser's options and positionals, -h/--help left out."""
    parser = importlib.import_module(script).get_args_parser()
    return [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]


def parser_flags(script):
    """[(names the option or positional goes by)] of the script's parser."""
    return [tuple(action.option_strings) or (action.dest,) for action in parser_actions(script)]


@pytest.mark.parametrize("script", sorted(FLAG_PAGES))
def test_every_flag_of_the_parser_is_in_its_page_and_back(script):
    page = FLAG_PAGES[script]
    documented = documented_flags(page)
    known = parser_flags(script)
    missing = [names[-1] for names in known if not any(name in documented for name in names)]
    assert not missing, (f"{page}'s flag table lacks {', '.join(missing)} of {script}.py: add a "
                         "row (flag, default, meaning) for each")
    every_name = {name for names in known for name in names}
    stale = sorted(set(documented) - every_name)
    assert not stale, (f"{page}'s flag table documents {', '.join(stale)}, which {script}.py's "
                       "parser does not have: correct or remove the row")


@pytest.mark.parametrize("script", sorted(FLAG_PAGES))
def test_every_choice_of_a_flag_is_named_in_its_page(script):
    page = FLAG_PAGES[script]
    text = FENCE.sub("", (PROJECT / page).read_text())
    named = {word for span in re.findall(r"`([^`]+)`", text)
             for word in re.findall(r"[\w.-]+", span)}
    unnamed = [f"{action.option_strings[-1]} {choice}" for action in parser_actions(script)
               if action.choices for choice in action.choices if str(choice) not in named]
    assert not unnamed, (f"{page} never names these choices of {script}.py's flags in `code`: "
                         f"{', '.join(unnamed)}; say what each does in the flag's row")


def test_flag_tables_are_read_as_written():
    """The table reader itself: a row naming two flags, the header skipped, the table's end."""
    text = ("| flag | default | meaning |\n|---|---|---|\n| `input` | | an image |\n"
            "| `--batch_size N`, `--workers` | 64 | for folders |\n\nafter the table\n"
            "| flag | x |\n")
    assert table_rows(text, "flag") == ["`input`", "`--batch_size N`, `--workers`"]
    assert table_rows(text, "key") is None


def python_snippets(page, needle="Predictor("):
    """The page's python code blocks that contain needle, dedented (a block in a list item
    is indented)."""
    return [textwrap.dedent(code) for language, code in FENCE.findall((PROJECT / page).read_text())
            if language == "python" and needle in code]


@pytest.fixture
def documented_files(trained, subset, tmp_path, monkeypatch):
    """A folder where the snippets' own paths exist: checkpoints/checkpoint.pth (the trained
    run's) and flower.jpg (a test photo of class "1"); returns the photo."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint.pth").symlink_to(trained[1] / "checkpoint.pth")
    photo = sorted((subset / "test" / "1").iterdir())[0]
    (tmp_path / "flower.jpg").symlink_to(photo)
    monkeypatch.chdir(tmp_path)
    return photo


@pytest.mark.parametrize("page", ["README.md", "docs/predict.md"])
def test_documented_predictor_snippet_runs_and_returns_what_it_says(page, documented_files,
                                                                    trained, capsys):
    (snippet,) = python_snippets(page)
    namespace = {}
    exec(compile(snippet, page, "exec"), namespace)
    prediction = namespace["prediction"]
    # top_k=5 on a 3-class checkpoint: all three classes, most likely first, named from the
    # snippet's category_names where it has a name and by folder elsewhere.
    assert sorted(prediction.classes) == ["1", "10", "2"]
    assert prediction.names == [{"1": "pink primrose"}.get(name, name)
                                for name in prediction.classes]
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert sum(prediction.probabilities) == pytest.approx(1, abs=1e-4)
    assert "pink primrose" in capsys.readouterr().out
    if page == "docs/predict.md":
        assert prediction.known in (True, False)  # the trained checkpoint has the verdict
        assert list(namespace["result"].as_json()) == ["path", "classes", "names",
                                                       "probabilities", "known"]
        # predict.py's answer for the same photo: the documented call is predict.py's own.
        cli = run_command("predict.py", documented_files, trained[1] / "checkpoint.pth",
                          "--top_k", "5", "--json")
        assert cli.returncode == 0, cli.stderr
        answer = json.loads(cli.stdout)
        assert answer["classes"] == prediction.classes
        assert answer["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-5)


def heading_anchor(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {heading_anchor(line.lstrip("#")) for line in path.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_lead_somewhere(page):
    source = PROJECT / page
    text = FENCE.sub("", source.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (source.parent / file_part).resolve() if file_part else source
        assert linked.is_file(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), (f"{page} links to {target}, but {file_part or page}"
                                               " has no such heading")


def bold_mean(text, row_start):
    """The bold mean ("**97.61 ± 0.42%**" or "**96.35%**", the row's last bold figure) of the
    benchmarks table row that starts with row_start, as a Decimal."""
    from decimal import Decimal

    rows = [line for line in text.splitlines() if line.startswith(row_start)]
    assert rows, f"benchmarks/README.md has no row starting {row_start!r}"
    return [Decimal(figure) for figure in re.findall(r"\*\*(\d+\.\d+)(?: ± [\d.]+)?%\*\*",
                                                     rows[-1])][-1]


def test_quoted_figures_agree_with_benchmarks_readme():
    """The head alone's accuracy gap and the checkpoint's size, wherever the pages quote them,
    are the figures benchmarks/README.md measured: the gap from its tables (the default's mean
    over both seeds' folds against the head alone's default), the size from its sentence."""
    from decimal import ROUND_HALF_UP, Decimal

    benchmarks = (PROJECT / "benchmarks/README.md").read_text()
    default = "| **stages, 12 epochs, lr 3e-4, batch norms folded: the default** |"
    seeds = [bold_mean(table, default) for table in benchmarks.split("| `--seed 1` folds |")]
    head_alone = bold_mean(benchmarks, "| **40 epochs, batch 128, lr 0.002: the head alone's")
    gap = ((sum(seeds) / 2) - head_alone).quantize(Decimal("0.01"), ROUND_HALF_UP)
    assert gap == Decimal("1.25")
    quotes = {}
    for page in PAGES:
        text = (PROJECT / page).read_text()
        for figure in re.findall(r"(\d+\.\d+)\s+points\s+(?:less accurate|above the head "
                                 r"alone)", text):
            quotes.setdefault(figure, []).append(page)
    assert set(quotes) == {str(gap)}, quotes
    assert {"README.md", "docs/train.md"} <= set(quotes[str(gap)])
    size = re.search(r"The checkpoint is (\d+\.\d+) MB", benchmarks).group(1)
    assert f"it is {size} MB" in (PROJECT / "docs/data.md").read_text()
