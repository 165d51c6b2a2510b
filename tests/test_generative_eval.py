"""The generative path scored and held to a closed set: ICD-10-CM answers read as a coder reads them
(well-formed / valid / chapter / category / exact), constrained decoding over a token trie of the allowed
answers (checked against a step-by-step masked argmax), and `fedslm predict` reading the column the
adapter was trained on."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.data.codes import Chapters, answer, score
from fedslm.errors import ModelError
from fedslm.lora import save_adapter
from fedslm.lora.adapter import adapter_meta
from fedslm.lora.merge import load_tuned
from fedslm.models.generate import AnswerTrie, generate, generate_batch
from fedslm.train import build_node

CHAPTERS = Chapters.from_names(["Certain infectious and parasitic diseases (A00-B99)", "Neoplasms (C00-D49)",
                                "Diseases of the respiratory system (J00-J99)"])
# A hand-made code list: a category and some of its subcodes, as in ICD-10-CM.
VALID = frozenset({"J20", "J20.6", "J20.9", "J45.909", "C50.1", "C50.11", "A09"})


def test_each_answer_is_scored_well_formed_valid_chapter_category_and_exact_as_counted_by_hand():
    truths = ["J20.6", "J20.6", "J20.6", "J20.6", "C50.11", "A09", "J20.9"]
    answers = [
        " J20.6 (Diseases of the respiratory system (J00-J99))",  # everything right
        " J20.7",       # well-formed, not a code (not valid), right category J20 and chapter J00-J99, not exact
        " J45.909",     # valid, right chapter, wrong category, not exact
        " C50.1",       # valid, wrong chapter, wrong category
        " C50.1",       # valid, right chapter and category, not exact (C50.11 is the truth)
        "the code is A09",  # not well-formed: the first token is no code, so nothing else counts
        " B99.9",       # well-formed, not in the list, chapter A00-B99 (truth's is J00-J99), wrong category
    ]
    s = score(answers, truths, CHAPTERS, VALID)
    # well-formed: all but "the code is"; valid: J20.6, J45.909, C50.1, C50.1; chapter: rows 1, 2, 3, 5;
    # category: rows 1, 2, 5; exact: row 1.
    assert (s.records, s.well_formed, s.valid, s.chapter, s.category, s.exact) == (7, 6, 4, 4, 3, 1)
    d = s.as_dict()
    assert d["valid_code"] == pytest.approx(4 / 7) and d["right_category"] == pytest.approx(3 / 7)
    assert d["exact_code"] == pytest.approx(1 / 7) and d["well_formed"] == pytest.approx(6 / 7)
    assert score(answers, truths, CHAPTERS).as_dict()["valid_code"] is None  # no code list: not claimed
    with pytest.raises(ValueError, match="7 completions for 6"):
        score(answers, truths[:6], CHAPTERS, VALID)


def test_the_bundled_code_list_holds_every_code_of_the_instruct_data_and_nothing_made_up():
    from fedslm.data.bundled import icd10_codes, load_icd10_instruct

    codes = icd10_codes()
    data = load_icd10_instruct()
    truths = [e.completion.split()[0] for e in data.test[:500]]
    assert all(t in codes for t in truths)
    assert all(e.completion.startswith(answer(t) + " (") for e, t in zip(data.test[:500], truths))
    assert {"J20", "J20.6"} <= codes and not {"J20.99", "Z99.99999", ""} & codes


def test_the_code_only_data_asks_the_same_held_out_prompts_and_answers_with_the_code_alone():
    from fedslm.data.bundled import load_icd10_codes, load_icd10_instruct

    codes, instruct = load_icd10_codes(), load_icd10_instruct()
    assert codes.source == "icd10-codes" and codes.task == "causal_lm"
    assert (len(codes.train), len(codes.test)) == (len(instruct.train), len(instruct.test))
    for mine, theirs in ((codes.test[:500], instruct.test[:500]), (codes.train[:500], instruct.train[:500])):
        assert [e.prompt for e in mine] == [e.prompt for e in theirs]  # the same fixed split, in the same order
        assert [e.completion for e in mine] == [answer(t.completion.split()[0]) for t in theirs]


# Answers made of the tiny tokenizer's words: several share prefixes, one is a prefix of another.
ANSWERS = ["fever", "fever cough", "fever cough rash", "lung disease", "lung injury acute", "bone fracture left"]
PROMPTS = ["the chest pain code", "severe acute", "mild rash of the left arm with fever due to infection code",
           "chronic heart disease", "code", "upper lower"]


def _reference(model, tokenizer, trie_ids: list[list[int]], prompt: str, eos: int) -> list[int]:
    """The obviously correct constrained greedy decode: one prompt alone, the full forward pass at each
    step, and the argmax over the tokens that continue some answer's id list (or end a whole one)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    while True:
        nxt = {seq[len(out)] for seq in trie_ids if seq[:len(out)] == out and len(seq) > len(out)}
        if out in trie_ids:
            nxt.add(eos)
        logits = model(input_ids=torch.tensor([ids[0].tolist() + out])).logits[0, -1]
        allowed = sorted(nxt)
        token = allowed[int(logits[allowed].argmax())]
        if token == eos:
            return out
        out.append(token)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)


def test_the_trie_allows_exactly_the_next_tokens_of_the_answers_that_share_the_prefix(llama):
    _, tok = llama
    trie = AnswerTrie(tok, ANSWERS)
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    assert trie.size == len(ANSWERS) and trie.depth == 3 and trie.ends == [tok.eos_token_id]
    prefixes = {tuple(seq[:k]) for seq in ids for k in range(len(seq) + 1)}
    for prefix in prefixes:
        expected = {seq[len(prefix)] for seq in ids if tuple(seq[:len(prefix)]) == prefix and len(seq) > len(prefix)}
        if list(prefix) in ids:
            expected.add(tok.eos_token_id)
        assert sorted(trie.allowed(list(prefix))) == sorted(expected), prefix
    assert trie.allowed(ids[0] + [tok.eos_token_id]) == [tok.eos_token_id]  # after an answer: nothing but EOS
    with pytest.raises(ModelError, match="1 of 2 answers cannot be written"):
        AnswerTrie(tok, ["fever", "J20.6"])  # the tiny vocabulary has no way to write a code


def test_constrained_greedy_answers_only_from_the_set_and_as_the_masked_argmax_does_in_batches(llama):
    model, tok = llama
    trie = AnswerTrie(tok, ANSWERS)
    free = generate_batch(model, tok, PROMPTS, max_new_tokens=4, batch_size=4)
    held = generate_batch(model, tok, PROMPTS, max_new_tokens=4, batch_size=4, trie=trie)
    # Random weights: free greedy writes words outside the set; held to the trie, every answer is in it.
    assert any(text.strip() not in ANSWERS for text in free)
    assert all(text.strip() in ANSWERS for text in held), held
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    expected = [tok.decode(_reference(model, tok, ids, p, tok.eos_token_id)) for p in PROMPTS]
    assert [t.strip() for t in held] == expected  # prompts of different lengths, left-padded in batches of 4
    assert generate(model, tok, PROMPTS[2], trie=trie).strip() == expected[2]
    assert len(set(expected)) > 1  # the prompt decides the answer, not the trie alone


@pytest.fixture
def causal_adapter(causal_config, tmp_path):
    """A tiny Llama + fresh LoRA saved as a run's adapter folder (B = 0: exactly the base's answers)."""
    cfg = causal_config()
    node = build_node(cfg)
    return save_adapter(node.model, tmp_path / "adapter", adapter_meta(cfg, node.base.fingerprint))


def test_generate_and_predict_with_choices_answer_only_lines_of_the_file(causal_adapter, tmp_path):
    choices = tmp_path / "choices.txt"
    choices.write_text("\n".join(ANSWERS) + "\n\n")
    res = CliRunner().invoke(app, ["generate", "-a", str(causal_adapter), "-p", "the chest pain code",
                                   "--choices", str(choices)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().removeprefix("the chest pain code").strip() in ANSWERS
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "answers.jsonl"
    res = CliRunner().invoke(app, ["predict", "-a", str(causal_adapter), "-i", str(source), "-o", str(out),
                                   "--choices", str(choices), "-b", "4"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(r["completion"].strip() in ANSWERS for r in rows)
    tuned = load_tuned(causal_adapter)
    trie = AnswerTrie(tuned.base.tokenizer, ANSWERS)
    assert [r["completion"] for r in rows] == [generate(tuned.model, tuned.base.tokenizer, p, trie=trie)
                                               for p in PROMPTS]
    both = CliRunner().invoke(app, ["generate", "-a", str(causal_adapter), "-p", "x", "--constrained",
                                    "--choices", str(choices)])
    assert both.exit_code == 2 and "give one" in both.output and "Traceback" not in both.output
    codes = CliRunner().invoke(app, ["generate", "-a", str(causal_adapter), "-p", "code", "--constrained"])
    assert codes.exit_code == 2 and "cannot be written with this tokenizer" in codes.output


def _body_csv(path, rows):
    path.write_text("body,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows), encoding="utf-8")
    return path


def test_predict_reads_the_column_the_adapter_was_trained_on_and_names_the_columns_present(
        cls_config, tmp_path):
    from conftest import _class_rows

    data = _body_csv(tmp_path / "train.csv", _class_rows(60))
    cfg = cls_config(f"data.source={data}", "data.text_column=body")
    node = build_node(cfg)
    adapter = save_adapter(node.model, tmp_path / "run" / "adapter",
                           adapter_meta(cfg, node.base.fingerprint, list(node.data.labels)))
    new = tmp_path / "new.csv"
    new.write_text("id,body\n1,heart chest pain\n2,lung cough\n")
    res = CliRunner().invoke(app, ["predict", "-a", str(adapter), "-i", str(new)])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["line"] for line in res.stdout.splitlines()] == [2, 3]
    other = tmp_path / "other.csv"
    other.write_text("id,note\n1,heart chest pain\n")
    res = CliRunner().invoke(app, ["predict", "-a", str(adapter), "-i", str(other)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    error = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "missing column 'body'" in error[0] and "columns found: id, note" in error[0]
    assert "trained on column 'body'" in error[0]
    res = CliRunner().invoke(app, ["predict", "-a", str(adapter), "-i", str(other), "--column", "note"])
    assert res.exit_code == 0, res.output
    # An adapter written before fedslm.json named its column: the run folder's config.yaml says it.
    meta = json.loads((adapter / "fedslm.json").read_text())
    del meta["text_column"]
    (adapter / "fedslm.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(app, ["predict", "-a", str(adapter), "-i", str(new)])
    assert res.exit_code == 2 and "missing column 'text'" in res.output  # no config.yaml: the default
    (adapter.parent / "config.yaml").write_text("data:\n  text_column: body\n")
    res = CliRunner().invoke(app, ["predict", "-a", str(adapter), "-i", str(new)])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def char_llama_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer writes any printable text one character a token (as a byte-level
    tokenizer can write every code): enough to score real ICD-10-CM prompts and codes."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("char-llama")
    vocab = {t: i for i, t in enumerate(["<pad>", "[UNK]", "<s>", "</s>", *dict.fromkeys(string.printable)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_generative_benchmark_scores_free_and_constrained_answers_and_constrained_ones_are_real_codes(
        char_llama_dir, causal_config, tmp_path):
    import importlib.util
    from pathlib import Path

    cfg = causal_config(f"model.name={char_llama_dir}", "model.max_length=64")
    node = build_node(cfg)
    adapter = save_adapter(node.model, tmp_path / "run" / "adapter", adapter_meta(cfg, node.base.fingerprint))
    spec = importlib.util.spec_from_file_location(
        "generative_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "generative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from fedslm.config.load import to_yaml

    # The run folder's own records, as `fedslm simulate` leaves them: its config, summary and per-round metrics.
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"wall_seconds": 12.34}))
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps({"round": r, "clients": [
        {"institution": i, "steps": 3, "noise_multiplier": 0.5} for i in (0, 1)]}) for r in (1, 2)) + "\n")
    out = tmp_path / "results"
    assert bench.main(["--adapter", str(adapter), "--records", "4", "--max-new-tokens", "8", "--threads", "1",
                       "--batch-size", "3", "--out", str(out), "--note", "one thread"]) == 0
    result = json.loads((out / "generative.json").read_text())
    assert result["records"] == 4
    assert result["recipe"]["lora"]["r"] == cfg.lora.r and result["recipe"]["train"]["lr"] == cfg.train.lr
    assert result["recipe"]["privacy"]["target_epsilon"] == cfg.privacy.target_epsilon
    assert result["training_wall_seconds"] == 12.3 and result["benchmark_wall_seconds"] > 0
    assert result["dp_steps_per_institution"] == {"0": 6, "1": 6} and result["note"] == "one thread"
    for name in ("before_constrained", "after_constrained"):
        row = result[name]
        assert row["well_formed"] == row["valid_code"] == 1.0, row  # every constrained answer is a real code
        assert all(r["code"] is not None and r["answer"] == " " + r["code"] for r in row["first"])
    free = result["before"]
    assert free["valid_code"] < 1.0  # random weights write no code unconstrained
    for key in ("well_formed", "valid_code", "right_chapter", "right_category", "exact_code"):
        assert key in free
    md = (out / "generative.md").read_text()
    assert "valid code" in md and "base + adapter, constrained" in md and "target ≥ 95%" in md


def test_the_recipe_study_judges_its_targets_against_the_best_non_private_row(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("recipe_bench",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe, "RESULTS", tmp_path)

    def row(name, acc, eps=None, institutions=5, overrides=()):
        return {"name": name, "accuracy": acc, "epsilon": eps, "institutions": institutions,
                "overrides": list(overrides)}

    rows = [row("centralized, non-private, head on the frozen encoder (linear probe)", 0.9388, institutions=1),
            row(recipe.END_TO_END, 0.9677, institutions=1),
            row("federated, DP ε=8", 0.9500, 7.99),
            row("federated, DP ε=3", 0.9100, 2.99),                      # 5.8 below: not met by 0.8
            row("distributed, each counting on 5 honest, ε=1", 0.9600, 0.99),  # not local DP: not judged
            row("lever: the head alone (LoRA's control), ε=8", 0.9400, 7.99),
            row("lever: LoRA on the top layer, ε=8", 0.9550, 7.99, overrides=["lora.layers=1"])]  # 1.3 below: met
    assert recipe.reference(rows)["name"] == recipe.END_TO_END
    lines = recipe.targets(rows, recipe.reference(rows))
    text = "\n".join(lines)
    assert "ε=8, best row (lever: LoRA on the top layer, ε=8): 1.3 points below (target ≤ 3): met" in text
    assert "ε=3, best row (federated, DP ε=3): 5.8 points below (target ≤ 5): not met, by 0.8 points" in text
    assert "- federated local DP ε=1: not measured" in text
    assert "LoRA-bearing at ε=8 (lever: LoRA on the top layer, ε=8, 0.9550) vs the best head-only row " \
           "(federated, DP ε=8, 0.9500): +0.5 points: met" in text
    assert "generative: not measured" in text
    (tmp_path / "generative.json").write_text(json.dumps({
        "model": "gemma3-270m", "epsilon_per_institution": {"0": 7.9},
        "after": {"valid_code": 0.9, "right_chapter": 0.5, "exact_code": 0.01},
        "after_constrained": {"valid_code": 1.0, "right_chapter": 0.81, "exact_code": 0.05}}))
    text = "\n".join(recipe.targets(rows, recipe.reference(rows)))
    assert "constrained): valid code 100.0% (target ≥ 95%): met" in text
    assert "constrained): right chapter 81.0% (target ≥ 80%): met" in text and "exact code 5.0%" in text
