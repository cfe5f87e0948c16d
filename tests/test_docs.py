"""The README's commands and options are the code's."""

import re

from conftest import REPO


def readme():
    return (REPO / "README.md").read_text()


def test_readme_starts_with_install_quickstart_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1).splitlines()
    assert block[0].startswith("pip install -r requirements.txt")
    assert block[1].startswith("bash quickstart.sh") and (REPO / "quickstart.sh").exists()
    test_command = block[2].split("#")[0].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_options_section_is_what_the_parsers_generate(capsys):
    import options_table

    options_table.main()
    generated = capsys.readouterr().out.strip()
    section = readme().split("<!-- options:start -->")[1].split("<!-- options:end -->")[0].strip()
    assert section == generated, "README options are stale: run python tools/options_table.py and paste the output"


def test_every_flag_is_documented():
    import evaluate_dopsd
    import train_dopsd_full
    import train_dopsd_lora

    text = readme()
    for parser in (train_dopsd_lora.make_parser(), train_dopsd_full.make_parser(), evaluate_dopsd.make_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, flag
