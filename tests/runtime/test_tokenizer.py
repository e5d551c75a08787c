"""runtime/tokenizer.py encodes, decodes and renders chats exactly as transformers does.

Families: the bundled model, and tokenizers laid out as Llama 3 (BOS from tokenizer.json's
post-processor, template in tokenizer_config.json), Llama 2 / Mistral (add_bos_token in the
config, which transformers ignores beside a tokenizer.json; a template that raises on bad role
order), Qwen2 (no BOS, ChatML with loop controls and
tojson) and GPT-2 (no BOS, no template, special tokens only in tokenizer_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from kiln.errors import ArtifactError, RequestError
from kiln.models.zen import ZEN_DIR, zen_text
from kiln.runtime.server.prepare import ModelView, prepare_chat
from kiln.runtime.server.schemas import ChatRequest
from kiln.runtime.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Beautiful is better than ugly.",
    " leading space, trailing space ",
    "naïve façade ☃ 日本語 🎉🐍 — “quoted”",
    "line one\nline two\n\n\ttabbed",
    "",
]
CHATS = [
    [{"role": "user", "content": "Beautiful is better than"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi ☃"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Zen?"},
    ],
    [{"role": "user", "content": "no None keys", "name": None}],
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = false %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
QWEN_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
<|im_start|>system
You are helpful. {{ {"tools": tools, "n": messages | length} | tojson }}<|im_end|>
    {%- endif %}
    {%- if message.role == 'bogus' %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{%- endif %}
"""

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"],
    "llama2": ["<s>", "</s>", "<unk>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gpt2": ["<|endoftext|>"],
}  # fmt: skip


def _save_family(name: str, folder: Path) -> Path:
    """A byte-level BPE trained on the Zen text, saved with the family's files and settings."""
    specials = SPECIALS[name]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([zen_text()], trainer=trainer)
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}
    if name == "llama3":  # BOS from the file's post-processor
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
        )
        config |= {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    elif name == "llama2":  # add_bos_token without a post-processor: transformers adds no BOS
        config |= {
            "bos_token": {"content": "<s>", "special": True, "__type": "AddedToken"},
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": [{"name": "default", "template": LLAMA2_TEMPLATE}],
        }
    elif name == "qwen2":  # transformers loads its own Qwen2Tokenizer class
        config["tokenizer_class"] = "Qwen2Tokenizer"
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config |= {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        (folder / "chat_template.jinja").parent.mkdir(parents=True, exist_ok=True)
        (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    else:  # gpt2: the special token is named only in special_tokens_map.json
        config |= {"tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": True}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["zen", "llama3", "llama2", "qwen2", "gpt2"])
def pair(request, tmp_path_factory):
    """(ours, transformers') for one family's folder."""
    if request.param == "zen":
        folder = ZEN_DIR
    else:
        folder = _save_family(request.param, tmp_path_factory.mktemp(request.param))
    ours = Tokenizer.from_folder(folder)
    assert ours is not None
    return ours, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == list(ref(text)["input_ids"])
    assert ours.encode(text, add_special_tokens=False) == list(
        ref(text, add_special_tokens=False)["input_ids"]
    )
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_apply_chat_template(pair, chat):
    ours, ref = pair
    messages = CHATS[chat]
    if not ours.chat_template:
        assert not getattr(ref, "chat_template", None)
        with pytest.raises(ValueError, match="no chat template"):
            ours.render_chat(messages)
        return
    for gen_prompt in (True, False):
        want = ref.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
        assert ours.render_chat(messages, add_generation_prompt=gen_prompt) == want
    ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ours.encode_chat(messages) == ids


def test_template_raise_exception_is_a_template_error(tmp_path):
    ours = Tokenizer.from_folder(_save_family("llama2", tmp_path / "llama2"))
    assert ours is not None
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        ours.render_chat(bad)


def test_server_answers_a_refused_conversation_with_400(tmp_path):
    ours = Tokenizer.from_folder(_save_family("llama2", tmp_path / "llama2"))
    model = ModelView("m", max_context=512, vocab=400, eos_ids=(1,), tokenizer=ours)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(RequestError, match="roles must alternate") as e:
        prepare_chat(ChatRequest.model_validate({"messages": twice}), model)
    assert (e.value.status, e.value.param) == (400, "messages")
    ok = prepare_chat(ChatRequest.model_validate({"messages": twice[:1]}), model)
    assert ok.prompt_ids == ours.encode_chat(twice[:1])


def test_config_without_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"no tokenizer\.json"):
        load_tokenizer([tmp_path])
    assert load_tokenizer([tmp_path / "absent"]) is None
