"""Examples and a small BPE tokenizer shared by the tokenisation tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flexmoe.data import Example, format_prompt


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


WITH_CONTEXT = Example(instruction="Translate the sentence into French.", context="The cat sleeps.",
                       response="Le chat dort.")


WITHOUT_CONTEXT = Example(instruction="Name a primary colour.", response="Red")


def small_bpe_tokenizer():
    """A byte-level BPE trained here on the two examples, with a chat template."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [format_prompt(WITH_CONTEXT), format_prompt(WITHOUT_CONTEXT), "Le chat dort. Red colour."] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
