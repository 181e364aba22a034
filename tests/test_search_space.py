"""Search spaces from the seed repositories' NNCF configs and from the plain YAML form.

Fixtures in tests/fixtures/nncf/ are short excerpts of IntelLabs/Hardware-Aware-Automated-Machine-Learning:
- shears_llama_7b_math_2layers.json: Shears/nncf_config/unified_math/nncf_shears_llama_7b_sparsity50.json, which
  lists every layer's group explicitly (32 x [q,k,v], 32 x [up], 32 x [down] lora_A; 96 x [32, 24, 16]; no search
  block), cut to 2 decoder layers.
- shears_llama_template.json: the '{re}'/'{*}' form of Shears/nncf_config/nncf_shears_llama.json (3 groups, [32, 24, 16]
  each, epochs/init_lr -1 filled in by utils.load_nncf_config, which copies each '{re}' group per layer).
- lonas_llama_7b_commonsense_2layers.json: LoNAS/nncf_config/unified_commonsense/nncf_lonas_llama_7b.json cut to 2
  layers: per layer [q,k,v] lora_A [32, 28]; [gate, up] self_linear + lora_B [11008, 9632, 8256, 6880, 5504];
  [gate, up] lora_A [32, 28]; no down_proj group; the real file's trailing comma after overwrite_groups_widths;
  search NSGA2, num_evals 400, population 5, ref_acc 0.45, acc_delta 0.01.
"""

import copy
import json
from pathlib import Path

import pytest
import yaml

from nlsflow.adapters.elastic import ElasticGroup
from nlsflow.errors import NlsflowError
from nlsflow.search.space_file import (
    NncfSearchSpace,
    WidthGroup,
    add_fixed_groups,
    group_name,
    load_search_space,
    parse_nncf_config,
    parse_plain,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nncf"
SHEARS = FIXTURES / "shears_llama_7b_math_2layers.json"
SHEARS_TEMPLATE = FIXTURES / "shears_llama_template.json"
LONAS = FIXTURES / "lonas_llama_7b_commonsense_2layers.json"
QKV = ("q_proj", "k_proj", "v_proj")
SHEARS_GROUPS = [
    ElasticGroup("qkv", QKV, (32, 24, 16)),
    ElasticGroup("up", ("up_proj",), (32, 24, 16)),
    ElasticGroup("down", ("down_proj",), (32, 24, 16)),
]
LONAS_SPACE = NncfSearchSpace(
    groups=[ElasticGroup("qkv", QKV, (32, 28)), ElasticGroup("gate_up", ("gate_proj", "up_proj"), (32, 28))],
    base_width_groups=[WidthGroup("gate_up_width", ("gate_proj", "up_proj"), (11008, 9632, 8256, 6880, 5504))],
    search={"algorithm": "nsga2", "num_evals": 400, "population": 5, "ref_acc": 0.45, "acc_delta": 0.01},
)
PREFIX = "PeftModelForCausalLM/LoraModel[base_model]/LlamaForCausalLM[model]/LlamaModel[model]/ModuleList[layers]/"


def _template() -> dict:
    return json.loads(SHEARS_TEMPLATE.read_text())


def _width(doc: dict) -> dict:
    return doc["bootstrapNAS"]["training"]["elasticity"]["width"]


def test_shears_explicit_layers_fold_into_per_layer_groups():
    space = load_search_space(SHEARS, rank=32, num_hidden_layers=2)
    assert space == NncfSearchSpace(SHEARS_GROUPS, [], {})
    assert load_search_space(SHEARS) == space  # layer count inferred from the indices 0..1


def test_shears_template_matches_explicit_form():
    assert parse_nncf_config(SHEARS_TEMPLATE, rank=32) == NncfSearchSpace(SHEARS_GROUPS, [], {})
    assert parse_nncf_config(_template(), num_hidden_layers=32).groups == SHEARS_GROUPS


def test_shears_expansion_at_llama_7b_size_folds_back():
    """Shears' utils.load_nncf_config expands each '{re}' group per layer (32 for LLaMA-7B): the same space."""
    doc = _template()
    width = _width(doc)
    expanded = [
        ([n.replace("{re}", "").replace("{*}", str(i)) for n in group], widths)
        for group, widths in zip(width["overwrite_groups"], width["overwrite_groups_widths"])
        for i in range(32)
    ]
    width["overwrite_groups"], width["overwrite_groups_widths"] = map(list, zip(*expanded))
    assert len(width["overwrite_groups"]) == 96
    assert parse_nncf_config(doc, rank=32, num_hidden_layers=32) == NncfSearchSpace(SHEARS_GROUPS, [], {})


def test_lonas_rank_groups_mlp_width_and_search():
    """The real LoNAS file needs jstyleson-style JSON (a trailing comma) and carries elastic MLP widths."""
    with pytest.raises(json.JSONDecodeError):
        json.loads(LONAS.read_text())
    space = load_search_space(LONAS, rank=32, module_sizes={"gate_proj": 11008, "up_proj": 11008}, num_hidden_layers=2)
    assert space == LONAS_SPACE
    # LoNAS leaves down_proj's LoRA out of the space: it keeps the trained rank
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "down_proj"]
    assert add_fixed_groups(space, targets, 32).groups[-1] == ElasticGroup(
        "down", ("down_proj",), (32,), per_layer=False
    )


@pytest.mark.parametrize("path", [SHEARS, LONAS])
def test_plain_yaml_form_round_trips(tmp_path, path):
    space = load_search_space(path)
    out = tmp_path / "space.yaml"
    out.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    assert load_search_space(out) == space


def test_plain_yaml_written_by_hand(tmp_path):
    out = tmp_path / "space.yaml"
    out.write_text(
        "groups:\n"
        "  - {name: qkv, modules: [q_proj, k_proj, v_proj], choices: [32, 28]}\n"
        "  - {name: gate_up, modules: [gate_proj, up_proj], choices: [32, 28], per_layer: true}\n"
        "width_groups:\n"
        "  - {name: gate_up_width, modules: [gate_proj, up_proj], choices: [11008, 9632, 8256, 6880, 5504]}\n"
        "search: {algorithm: NSGA2, num_evals: 400, population: 5, ref_acc: 0.45, acc_delta: 0.01}\n"
    )
    assert load_search_space(out, rank=32, module_sizes={"gate_proj": 11008, "up_proj": 11008}) == LONAS_SPACE


def test_group_names():
    assert [
        group_name(m) for m in (QKV, ("query", "key", "value"), ("up_proj",), ("gate_proj", "up_proj"), ("fc1",))
    ] == ["qkv", "qkv", "up", "gate_up", "fc1"]


def test_layer_free_and_all_layer_groups_are_shared():
    doc = _template()
    lm_head = "PeftModelForCausalLM/LoraModel[base_model]/LlamaForCausalLM[model]/Linear[lm_head]/ModuleDict[lora_A]/"
    _width(doc)["overwrite_groups"][1] = [lm_head + "NNCFLinear[default]/linear_0"]
    _width(doc)["overwrite_groups"][2] = [
        f"{PREFIX}LlamaDecoderLayer[{i}]/LlamaMLP[mlp]/Linear[down_proj]/ModuleDict[lora_A]"
        f"/NNCFLinear[default]/linear_0"
        for i in range(4)
    ]
    groups = parse_nncf_config(doc, num_hidden_layers=4).groups
    assert [(g.name, g.per_layer) for g in groups] == [("qkv", True), ("lm_head", False), ("down", False)]


def _node(
    layer, module="q_proj", tail="ModuleDict[lora_A]/NNCFLinear[default]/linear_0", block="LlamaAttention[self_attn]"
):
    return f"{PREFIX}LlamaDecoderLayer[{layer}]/{block}/Linear[{module}]/{tail}"


def _mutate(edit):
    def build():
        doc = _template()
        edit(_width(doc), doc)
        return doc

    return build


ERRORS = [
    (
        "not descending",
        _mutate(lambda w, d: w["overwrite_groups_widths"].__setitem__(1, [16, 24, 32])),
        {},
        r"group 'up' \(overwrite_groups\[1\]\): choices \[16, 24, 32\].*descending",
    ),
    (
        "fewer width lists",
        _mutate(lambda w, d: w["overwrite_groups_widths"].pop()),
        {},
        r"group 'down' \(overwrite_groups\[2\]\) has no width list",
    ),
    (
        "more width lists",
        _mutate(lambda w, d: w["overwrite_groups_widths"].append([8])),
        {},
        r"4 lists but overwrite_groups only 3 groups",
    ),
    (
        "unknown node",
        _mutate(
            lambda w, d: w["overwrite_groups"][0].append(
                "{re}" + _node("{*}", "o_proj", "Dropout[lora_dropout]/dropout_0")
            )
        ),
        {},
        r"overwrite_groups\[0\]: unknown node pattern .*o_proj",
    ),
    (
        "{*} without {re}",
        _mutate(lambda w, d: w["overwrite_groups"][1].__setitem__(0, w["overwrite_groups"][1][0][4:])),
        {},
        r"overwrite_groups\[1\]: node .* '\{re\}' and '\{\*\}' together",
    ),
    (
        "module in two groups",
        _mutate(lambda w, d: w["overwrite_groups"][1].append("{re}" + _node("{*}", "k_proj"))),
        {},
        r"'k_proj' is in group 'qkv' \(overwrite_groups\[0\]\) and in group 'up_k' \(overwrite_groups\[1\]\)",
    ),
    ("rank mismatch", _template, {"rank": 16}, r"group 'qkv'.*start at 32.*trained rank is 16"),
    (
        "lora_A mixed with a module output",
        _mutate(
            lambda w, d: w["overwrite_groups"][1].append(
                "{re}" + _node("{*}", "up_proj", "NNCFUserSelfLinear[self_linear]/linear_0", "LlamaMLP[mlp]")
            )
        ),
        {},
        r"group 'up' \(overwrite_groups\[1\]\) mixes LoRA ranks",
    ),
    (
        "unsupported dimension",
        _mutate(
            lambda w, d: d["bootstrapNAS"]["training"]["elasticity"].__setitem__(
                "available_elasticity_dims", ["width", "depth"]
            )
        ),
        {},
        r"only \['width'\]",
    ),
    (
        "search algorithm",
        _mutate(lambda w, d: d["bootstrapNAS"].__setitem__("search", {"algorithm": "RNSGA2"})),
        {},
        r"search.algorithm is 'RNSGA2'; only NSGA2",
    ),
    (
        "search int",
        _mutate(lambda w, d: d["bootstrapNAS"].__setitem__("search", {"num_evals": 0})),
        {},
        r"search.num_evals is 0; it must be a positive integer",
    ),
    (
        "search float",
        _mutate(lambda w, d: d["bootstrapNAS"].__setitem__("search", {"acc_delta": 1.5})),
        {},
        r"search.acc_delta is 1.5; it must be a number in \[0, 1\]",
    ),
    (
        "search key",
        _mutate(lambda w, d: d["bootstrapNAS"].__setitem__("search", {"mutation_prob": 0.1})),
        {},
        r"search keys \['mutation_prob'\] are not supported",
    ),
]


@pytest.mark.parametrize("build, kwargs, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_template_errors_name_the_group(build, kwargs, message):
    with pytest.raises(NlsflowError, match=message):
        parse_nncf_config(build(), **kwargs)


def _explicit() -> dict:
    return json.loads(SHEARS.read_text())


def test_explicit_layers_must_cover_the_model():
    with pytest.raises(
        NlsflowError, match=r"group 'qkv' \(overwrite_groups\[0\]\) is given for layers \[0, 1\], not for \[2, .*of 32"
    ):
        parse_nncf_config(_explicit(), num_hidden_layers=32)
    with pytest.raises(
        NlsflowError, match=r"group 'qkv' \(overwrite_groups\[0\]\) lists layer 1 but the model has 1 layers"
    ):
        parse_nncf_config(_explicit(), num_hidden_layers=1)
    doc = _explicit()
    del _width(doc)["overwrite_groups"][1], _width(doc)["overwrite_groups_widths"][1]  # qkv of layer 1
    with pytest.raises(
        NlsflowError, match=r"group 'qkv' \(overwrite_groups\[0\]\) is given for layers \[0\], not for \[1\]"
    ):
        parse_nncf_config(doc)


def test_explicit_layers_must_share_one_choice_list():
    doc = _explicit()
    _width(doc)["overwrite_groups_widths"][3] = [32, 16]  # up of layer 1
    with pytest.raises(
        NlsflowError, match=r"group 'up' \(overwrite_groups\[3\]\): widths \[32, 16\] differ from \[32, 24, 16\]"
    ):
        parse_nncf_config(doc)


def test_width_group_must_start_at_module_size():
    with pytest.raises(NlsflowError, match=r"width group 'gate_up_width'.*up_proj has 8192 outputs"):
        load_search_space(LONAS, module_sizes={"gate_proj": 11008, "up_proj": 8192})
    with pytest.raises(NlsflowError, match=r"width group 'gate_up_width': module_sizes has no entry for 'up_proj'"):
        load_search_space(LONAS, module_sizes={"gate_proj": 11008})


PLAIN = {
    "groups": [
        {"name": "qkv", "modules": list(QKV), "choices": [32, 16]},
        {"name": "up", "modules": ["up_proj"], "choices": [32, 16]},
    ]
}


@pytest.mark.parametrize(
    "edit, kwargs, message",
    [
        (
            lambda d: d["groups"][1].__setitem__("choices", [16, 32]),
            {},
            r"groups.1: .*group 'up': choices \[16, 32\] must be positive and strictly descending",
        ),
        (
            lambda d: d["groups"][1].__setitem__("modules", ["up_proj", "v_proj"]),
            {},
            r"'v_proj' is in group 'qkv' and in group 'up'",
        ),
        (lambda d: d["groups"][1].__setitem__("name", "qkv"), {}, r"group names \['qkv', 'qkv'\] must be unique"),
        (lambda d: d["groups"][0].__setitem__("rank", 32), {}, r"unknown key 'groups.0.rank'"),
        (lambda d: None, {"rank": 8}, r"group 'qkv'.*trained rank is 8"),
        (lambda d: d.__setitem__("search", {"population": True}), {}, r"search.population is True"),
    ],
    ids=["descending", "two groups", "names", "unknown key", "rank", "search"],
)
def test_plain_errors(edit, kwargs, message):
    doc = copy.deepcopy(PLAIN)
    edit(doc)
    with pytest.raises(NlsflowError, match=message):
        parse_plain(doc, **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(NlsflowError, match="not found"):
        load_search_space(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"bootstrapNAS": [1, 2')
    with pytest.raises(NlsflowError, match=r"bad.json is not valid JSON"):
        load_search_space(tmp_path / "bad.json")
    (tmp_path / "other.yaml").write_text("train: {rank: 8}\n")
    with pytest.raises(NlsflowError, match=r"neither an NNCF config .* nor a plain search space"):
        load_search_space(tmp_path / "other.yaml")
