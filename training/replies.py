"""A chat model's own greedy replies to a fixed set of prompts: training text in the register that
contrastive decoding sees, where the default corpus (the standard library) is code."""

from dataclasses import dataclass
from pathlib import Path

from counterpoint.decoding import SamplingParams
from counterpoint.serving.llm import LLM

PROMPTS = (
    "What is the capital of Japan?", "Explain how vaccines work.", "Write a short story about a lost dog.",
    "How do I sort a dictionary by value in Python?", "What caused the fall of the Roman Empire?",
    "Give me tips for staying focused while studying.", "What is the difference between weather and climate?",
    "Summarise the plot of Pride and Prejudice.", "How does a car engine work?", "Write a poem about the moon.",
    "What is a neural network?", "Suggest a quick vegetarian dinner.", "Why do leaves change colour in autumn?",
    "How do you say 'thank you' in German?", "What is the area of a circle with radius 3?",
    "Write a thank-you note to a teacher.", "Who discovered penicillin?", "What are the three states of matter?",
    "What is supply and demand?", "Describe a rainy day in the city.", "How do I start running as a beginner?",
    "Explain gravity in simple terms.", "Write a Python function that checks if a number is prime.",
    "What is the tallest mountain in the world?", "How do I make a cup of tea?",
    "What is the longest river in Africa?", "Tell me an interesting fact about honey bees.",
    "How can I be more productive at work?", "What is the function of the heart?",
    "Write a joke about computers.", "What are the benefits of reading books?",
    "How far is the Moon from the Earth?", "What is democracy?", "Explain the water cycle.",
    "Recommend three classic novels.", "What is the difference between HTML and CSS?",
    "Who was Albert Einstein?", "How do plants get their food?", "What is a healthy amount of sleep for adults?",
    "Write a motivational quote.", "What is the capital of Australia?", "How does the internet work?",
    "What are prime numbers?", "Describe the taste of chocolate.", "How do I write a good resume?",
    "What is climate change?", "Explain what an API is.", "What do pandas eat?",
)


@dataclass(frozen=True)
class Reply:
    """One prompt through the chat template and the model's greedy reply, as text and as tokens."""

    prompt: str
    reply: str
    prompt_ids: list[int]
    reply_ids: list[int]


def greedy_replies(model: Path, prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 96,
                   show_progress: bool = True) -> list[Reply]:
    """The model's greedy reply to each prompt, rendered with its chat template."""
    # NOTE: float32: on a CPU without bf16 instructions, bf16 is emulated and decodes slower.
    llm = LLM(str(model), dtype="float32", show_progress=show_progress)
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    outputs = llm.chat(conversations, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=show_progress)
    tokenizer = llm.get_tokenizer()
    return [Reply(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                  output.outputs[0].text, list(output.prompt_token_ids), list(output.outputs[0].token_ids))
            for conversation, output in zip(conversations, outputs)]


def expert_replies(model: Path, prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 96,
                   show_progress: bool = True) -> list[str]:
    """Each prompt rendered with the model's chat template, followed by the model's greedy reply."""
    return [r.prompt + r.reply for r in greedy_replies(model, prompts, max_tokens, show_progress)]
