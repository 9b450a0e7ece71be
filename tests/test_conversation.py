"""Conversations: image slot inside the user turn, labels on assistant replies and their end token only,
on the real SmolLM2 and GPT-2 tokenizers; chat and loglikelihood on a tiny VLM."""

import pytest
import torch

from helpers import supervised_text
from vlmlab.model.chat_format import build_pieces
from vlmlab.model.conversation import conversation_batch, encode_conversation
from vlmlab.model.sequence import IGNORE_INDEX

TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "On the left."},
]


def test_chatml_on_smollm2_supervises_only_the_replies_and_their_im_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    enc = encode_conversation(tok, "chatml", TWO_TURNS, end)
    assert supervised_text(tok, enc) == "A red circle.<|im_end|>On the left.<|im_end|>"
    assert [i for i, lab in zip(enc.ids, enc.labels) if lab != IGNORE_INDEX].count(end) == 2
    # the image slot is inside the first user turn, after its header
    assert tok.decode(enc.ids[: enc.image_position]) == "<|im_start|>user\n"
    # the same text, rendered by the tokenizer's own template (minus its default system turn), is what we built
    templated = tok.apply_chat_template(
        [{**m, "content": m["content"].replace("<image>\n", "")} for m in TWO_TURNS], tokenize=False
    )
    assert tok.decode(enc.ids) == templated[templated.index("<|im_start|>user") :]


def test_placeholder_in_a_later_turn_puts_the_image_there(smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    msgs = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Look: <image> what colour?"},
    ]
    enc = encode_conversation(tok, "chatml", msgs, end, generation=True)
    before = tok.decode(enc.ids[: enc.image_position])
    assert before.endswith("<|im_start|>user\nLook:") and "Hi." in before
    assert tok.decode(enc.ids).endswith("<|im_start|>assistant\n")
    assert supervised_text(tok, enc) == "Hi.<|im_end|>"  # labels are computed in generation mode too
    no_placeholder = encode_conversation(tok, "chatml", msgs[:1], end, generation=True)
    assert tok.decode(no_placeholder.ids[: no_placeholder.image_position]) == "<|im_start|>user\n"


def test_gpt2_format_and_end_token_equal_to_pad(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = encode_conversation(tok, "gpt2", TWO_TURNS, eos)
    assert supervised_text(tok, enc) == " A red circle.<|endoftext|> On the left.<|endoftext|>"
    batch = conversation_batch([enc, encode_conversation(tok, "gpt2", TWO_TURNS[:2], eos)], pad_id=eos)
    # padding uses the same id as the end token; only the real end tokens are labelled
    assert int((batch.labels == eos).sum()) == 3
    assert batch.image_positions.tolist() == [enc.image_position] * 2


def test_truncation_that_cuts_an_answer_drops_its_end_token(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    full = encode_conversation(tok, "gpt2", TWO_TURNS[:2], eos)
    cut = encode_conversation(
        tok, "gpt2", TWO_TURNS[:2], eos, max_tokens=len(full.ids) - 4
    )  # drops " circle", ".", END, "\n"
    assert cut.truncated and eos not in [t for t, lab in zip(cut.ids, cut.labels) if lab != IGNORE_INDEX]
    assert supervised_text(tok, cut) == " A red"


def test_plain_format_is_image_then_text(gpt2_tokenizer):
    pieces = build_pieces("plain", TWO_TURNS[:2], generation=False)
    assert pieces[0].image and pieces[1].text == "A red circle." and pieces[1].supervised and pieces[2].end


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], "at least one message"),
        ([{"role": "assistant", "content": "x"}], "starts with a user"),
        ([{"role": "user", "content": "<image> <image>"}], "2 <image> placeholders"),
        ([{"role": "bot", "content": "x"}], "message 0"),
    ],
)
def test_bad_conversations_are_refused(messages, error):
    with pytest.raises(ValueError, match=error):
        build_pieces("chatml", messages, generation=False)


@pytest.fixture(scope="module")
def tiny_vlm(tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.config import load_config
    from vlmlab.model.vlm import build_vlm

    cfg = load_config(None, [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}", "connector.num_queries=4"])
    return build_vlm(cfg).eval()


def test_visual_tokens_are_spliced_at_the_placeholder(tiny_vlm):
    text = tiny_vlm.conversation_text_batch([TWO_TURNS])
    visual = torch.randn(1, 4, 64)
    embeds, mask, labels = tiny_vlm._embed(visual, text)
    p = int(text.image_positions[0])
    assert torch.equal(embeds[0, p : p + 4], visual[0])
    assert (labels[0, p : p + 4] == IGNORE_INDEX).all() and mask.shape[1] == text.input_ids.shape[1] + 4


def test_the_chat_format_is_worked_out_once_not_per_message(tiny_vlm, monkeypatch):
    """get_vocab() copies the whole vocabulary (41 ms for SmolLM2): once per message it was a quarter of a vqa
    training step. The format and its end token are resolved once per data.conversation_format setting."""
    calls = []
    real = type(tiny_vlm.tokenizer).get_vocab
    monkeypatch.setattr(type(tiny_vlm.tokenizer), "get_vocab", lambda self: calls.append(1) or real(self))
    before = tiny_vlm.conversation_text_batch([TWO_TURNS] * 8)
    for _ in range(5):
        tiny_vlm.conversation_text_batch([TWO_TURNS] * 8)
    assert len(calls) <= 1 and tiny_vlm.conversation_format == "gpt2"
    monkeypatch.setattr(tiny_vlm.cfg.data, "conversation_format", "plain")  # another setting: resolved again
    plain = tiny_vlm.conversation_text_batch([TWO_TURNS])
    assert tiny_vlm.conversation_format == "plain" and plain.input_ids.shape[1] < before.input_ids.shape[1]


def test_chat_replies_and_the_image_reaches_the_loglikelihood(tiny_vlm, tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(a)
    Image.effect_noise((32, 32), 100).convert("RGB").save(b)
    msgs = [{"role": "user", "content": "<image> What is it?"}]
    reply = tiny_vlm.chat(str(a), msgs, max_new_tokens=4)
    assert isinstance(reply, str)
    ll_a, _ = tiny_vlm.loglikelihood(str(a), msgs, " a red circle")
    ll_b, _ = tiny_vlm.loglikelihood(str(b), msgs, " a red circle")
    ll_none, _ = tiny_vlm.loglikelihood(None, msgs, " a red circle")
    assert ll_a < 0 and ll_a != ll_b and ll_a != ll_none  # the image reaches the score
    batch = tiny_vlm.chat_batch([str(a), None], [msgs, [{"role": "user", "content": "Hi"}]], max_new_tokens=3)
    assert len(batch) == 2


def test_loglikelihood_is_greedy_for_the_argmax_token(tiny_vlm, tmp_path):
    from PIL import Image

    a = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(a)
    msgs = [{"role": "user", "content": "<image> Colour?"}]
    prompt = tiny_vlm.encode_messages(msgs, generation=True)
    from vlmlab.model.conversation import conversation_batch as batch_of

    text = batch_of([prompt], tiny_vlm.specials.pad_id)
    visual = tiny_vlm.visual_tokens(tiny_vlm.image_tokens_of([str(a)]))
    embeds, mask, _ = tiny_vlm._embed(visual, text)
    with torch.no_grad():
        logits = tiny_vlm.lm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
    best, worst = int(logits.argmax()), int(logits.argmin())
    ll_best, greedy_best = tiny_vlm.loglikelihood(str(a), msgs, tiny_vlm.tokenizer.decode([best]))
    _, greedy_worst = tiny_vlm.loglikelihood(str(a), msgs, tiny_vlm.tokenizer.decode([worst]))
    assert ll_best == pytest.approx(torch.log_softmax(logits, -1)[best].item(), abs=1e-4)
    assert greedy_best and not greedy_worst


def test_reply_logprobs_in_a_left_padded_batch_equal_each_row_alone_and_the_loglikelihood(tiny_vlm, tmp_path):
    """POPE's yes/no margin: a batch pads its shorter prompts on the left, which must change no row's score (GPT-2
    has absolute positions: without position ids from the mask a padded row would read shifted ones)."""
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(a)
    Image.effect_noise((32, 32), 100).convert("RGB").save(b)
    convs = [
        [{"role": "user", "content": "<image> Is there a cat in the image?"}],
        [{"role": "user", "content": "<image> Cat?"}],
        [{"role": "user", "content": "Is there a dog in this picture, would you say?"}],
    ]
    images = [str(a), str(b), None]
    words = [["yes"], ["no"]]
    batch = tiny_vlm.reply_logprobs(images, convs, words)
    assert batch.shape == (3, 2)
    for i, (image, conv) in enumerate(zip(images, convs)):
        alone = tiny_vlm.reply_logprobs([image], [conv], words)[0]
        assert torch.allclose(batch[i], alone, atol=1e-4), (i, batch[i], alone)
        for g, (word,) in enumerate(words):
            assert alone[g].item() == pytest.approx(tiny_vlm.loglikelihood(image, conv, word)[0], abs=1e-4)
    both = tiny_vlm.reply_logprobs([str(a)], convs[:1], [["yes", "Yes"]])[0, 0]
    assert both.item() > batch[0, 0].item()  # two casings of one answer add up
    assert batch[0, 0] != tiny_vlm.reply_logprobs([str(b)], convs[:1], words)[0, 0]  # the image reaches it


def test_options_scored_in_one_batch_equal_each_alone_and_a_cut_prompt_still_scores(tiny_vlm, tmp_path):
    """Multiple choice by likelihood: the options of a question go through one right-padded forward pass; each
    scores as it does alone (loglikelihood), with its token count; a prompt longer than the context is refused,
    or (cut_long) cut to fit."""
    from PIL import Image

    from vlmlab.model.context import PromptTooLong

    a = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(a)
    msgs = [{"role": "user", "content": "<image> Which colour?\nA. red\nB. a very dark shade of blue"}]
    options = ["red", "a very dark shade of blue", ""]
    scored = tiny_vlm.continuation_logprobs(str(a), msgs, options)
    for option, (logprob, tokens, greedy) in zip(options[:2], scored):
        alone, alone_greedy = tiny_vlm.loglikelihood(str(a), msgs, option)
        assert logprob == pytest.approx(alone, abs=1e-4) and greedy == alone_greedy
        assert tokens == len(tiny_vlm.tokenizer(option, add_special_tokens=False)["input_ids"])
    assert scored[2] == (0.0, 0, True)
    long = [{"role": "user", "content": "<image> " + "word " * (tiny_vlm.context_length + 10)}]
    with pytest.raises(PromptTooLong):
        tiny_vlm.continuation_logprobs(str(a), long, options)
    assert all(lp < 0 for lp, _, _ in tiny_vlm.continuation_logprobs(str(a), long, options[:2], cut_long=True))


def test_an_ended_continuation_is_the_whole_reply_with_its_end_token(tiny_vlm, tmp_path):
    """Closed-vocabulary answers: '1' must not beat '10' merely by being its start, so each is scored as the whole
    reply, the turn's end token after it (one more token, a lower log-probability than the open continuation)."""
    from PIL import Image

    a = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(a)
    msgs = [{"role": "user", "content": "<image> How many circles are there?"}]
    numbers = ["1", "10"]
    open_, ended = (tiny_vlm.continuation_logprobs(str(a), msgs, numbers, ended=e) for e in (False, True))
    for (lp, n, _), (lp_end, n_end, _) in zip(open_, ended):
        assert n_end == n + 1 and lp_end < lp
    end = tiny_vlm.tokenizer.decode([tiny_vlm.turn_end_id])
    whole = tiny_vlm.loglikelihood(str(a), msgs, "1")[0]
    assert ended[0][0] < whole and open_[0][0] == pytest.approx(whole, abs=1e-4) and end


def test_number_questions_alone_are_answered_from_the_closed_vocabulary(tiny_vlm, tmp_path):
    from PIL import Image

    from vlmlab.data.questions import Question
    from vlmlab.eval.question_scores import NUMBER_ANSWERS, number_picks, with_number_picks

    a = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(a)
    qs = [
        Question("1", str(a), "How many circles are there?", ["2"] * 10, "number", "how many"),
        Question("2", str(a), "What color is the circle?", ["blue"] * 10, "other", "what color is the"),
    ]
    picks = number_picks(tiny_vlm, qs, [str(a), str(a)])
    assert list(picks) == [0] and picks[0] in NUMBER_ANSWERS
    assert with_number_picks(["many", "blue"], picks) == [picks[0], "blue"]
