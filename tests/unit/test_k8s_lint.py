"""yamllint over every YAML file in k8s/, with k8s/.yamllint."""
from __future__ import annotations

from pathlib import Path

import pytest

yamllint_config = pytest.importorskip("yamllint.config")
from yamllint import linter  # noqa: E402

K8S = Path(__file__).resolve().parents[2] / "k8s"
FILES = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")


def test_there_is_something_to_lint():
    assert len(FILES) > 20


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(K8S)) for p in FILES])
def test_yamllint(path):
    conf = yamllint_config.YamlLintConfig(file=str(K8S / ".yamllint"))
    # ignore patterns in the config are matched against the path as given
    rel = path.relative_to(K8S.parent)
    if conf.is_file_ignored(str(rel)):
        pytest.skip("ignored by k8s/.yamllint")
    problems = [p for p in linter.run(path.read_text(), conf, str(rel)) if p.level == "error"]
    assert not problems, "\n".join(f"{rel}:{p.line}:{p.column} {p.message} ({p.rule})"
                                   for p in problems)
