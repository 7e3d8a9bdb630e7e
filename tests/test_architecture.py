"""The layer picture in docs/architecture.md is the import contract that `make test` enforces."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_docs_layer_list_is_the_contract():
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```text\n(.*?)```", page, re.S)
    assert block, "docs/architecture.md lost its layer block"
    assert block.group(1).strip().splitlines() == _contract_layers()


def test_every_package_module_sits_in_a_layer():
    named = set(re.findall(r"flowtext\.[\w.]+", " ".join(_contract_layers())))
    top = {
        f"flowtext.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "flowtext").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert top <= named, f"modules outside the layer contract: {sorted(top - named)}"
