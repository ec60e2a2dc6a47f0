"""`ChatTokenizer`: the same special tokens, templates and ids as transformers, without importing it; and
transformers wherever the files would not load unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jinja2
import pytest
from tokenizer_families import FAMILIES, TRICKY_ROWS, tokenizer_folder

from spo_ray.data import normalize_row
from spo_ray.data.chat_tokenizer import ChatTokenizer, load_chat_tokenizer
from spo_ray.data.templating import Templater, load_tokenizer

FEATURES = (  # what chat templates in the wild use: transformers' own globals, filters and tags
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system first') }}{% endif %}"
    "{% if m['content'] == 'STOP' %}{% break %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "{% endgeneration %}{% else %}{{ m['content'] | tojson }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations() -> list[list[dict]]:
    """Prompts and full conversations of the tricky rows."""
    examples = [normalize_row(row) for row in TRICKY_ROWS]
    out = [ex.prompt for ex in examples]
    out += [ex.prompt + [{"role": "assistant", "content": r}] for ex in examples for r in ex.responses]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_rust_tokenizer_and_template_give_what_transformers_gives(family, tiny_model_dir, tmp_path):
    path = tokenizer_folder(family, tiny_model_dir, tmp_path)
    light, reference = load_chat_tokenizer(path), load_tokenizer(path)
    assert isinstance(light, ChatTokenizer), f"{family} should load without transformers"
    assert light.special_tokens_map == reference.special_tokens_map
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert (getattr(light, name), getattr(light, f"{name}_id")) == (
            getattr(reference, name),
            getattr(reference, f"{name}_id"),
        ), name
    assert light.chat_template == reference.chat_template
    chats = conversations()
    for generation_prompt in (True, False):
        texts = light.apply_chat_template(chats, add_generation_prompt=generation_prompt)
        assert texts == reference.apply_chat_template(
            chats, tokenize=False, add_generation_prompt=generation_prompt
        )
        ids = [e.ids for e in light.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert ids == reference(texts, add_special_tokens=False)["input_ids"]
        assert [light.decode(i) for i in ids] == [reference.decode(i) for i in ids]
    assert light.apply_chat_template(chats[0]) == reference.apply_chat_template(chats[0], tokenize=False)


def test_template_globals_filters_and_tags_render_as_in_transformers(tiny_model_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(FEATURES)
    light, reference = load_chat_tokenizer(str(folder)), load_tokenizer(str(folder))
    assert isinstance(light, ChatTokenizer)
    chats = [
        [{"role": "user", "content": 'quote " and ünïcödé'}, {"role": "assistant", "content": "ok"}],
        [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "STOP"},
            {"role": "user", "content": "b"},
        ],
    ]
    rendered = light.apply_chat_template(chats, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    assert '"quote \\" and ünïcödé"' in rendered[0] and "STOP" not in rendered[1]  # tojson keeps Unicode
    bad = [[{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]]
    with pytest.raises(jinja2.TemplateError, match="system first"):
        light.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="system first"):
        reference.apply_chat_template(bad, tokenize=False)


def _edit_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


CHANGES = {  # what transformers would change on load, so the folder goes to transformers
    "a special token tokenizer.json lacks": lambda f: _edit_config(f, mask_token="<mask>"),
    "an extra special token it lacks": lambda f: _edit_config(f, additional_special_tokens=["<tool>"]),
    "split special tokens": lambda f: _edit_config(f, split_special_tokens=True),
    "several named templates": lambda f: _edit_config(
        f, chat_template=[{"name": "default", "template": "x"}]
    ),
    "an added token with other flags": lambda f: _edit_config(
        f, added_tokens_decoder={"0": {"content": "<|endoftext|>", "special": False}}
    ),
    "a legacy special_tokens_map.json": lambda f: (f / "special_tokens_map.json").write_text(
        '{"eos_token": "x"}'
    ),
    "no tokenizer.json": lambda f: (f / "tokenizer.json").unlink(),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_folders_transformers_would_change_load_with_transformers(change, tiny_model_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    template = folder / "chat_template.jinja"  # moved into the config, where a list of templates can go
    _edit_config(folder, chat_template=template.read_text())
    template.unlink()
    assert isinstance(load_chat_tokenizer(str(folder)), ChatTokenizer)  # the unchanged copy loads light
    CHANGES[change](folder)
    assert load_chat_tokenizer(str(folder)) is None
    if change != "no tokenizer.json":  # Templater falls back to transformers' tokenizer and still works
        templater = Templater.from_path(str(folder), max_length=64, max_prompt_length=32)
        assert not isinstance(templater.tokenizer, ChatTokenizer)
        assert templater.encode([normalize_row(TRICKY_ROWS[0])])[0].prompt_ids


def test_a_worker_tokenizes_without_importing_transformers(tiny_model_dir):
    """What each fresh Ray Data worker runs (`process_chunk`'s Templater), in a fresh interpreter."""
    code = (
        "import sys\n"
        "from spo_ray.data import normalize_row\n"
        "from spo_ray.data.templating import Templater\n"
        f"t = Templater.from_path({str(tiny_model_dir)!r}, 64, 32)\n"
        "print(len(t.encode([normalize_row({'prompt': 'Hi', 'chosen': 'a', 'rejected': 'b'})])[0].prompt_ids))\n"
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, imported = done.stdout.strip().splitlines()
    assert int(count) > 0 and imported == "[]"
