"""The bundled prompt set for `bench serve`: short, varied instructions (no download needed)."""

TOPICS = [
    "the water cycle", "how vaccines train the immune system", "the history of the printing press",
    "why the sky is blue", "how a bicycle stays upright", "the rules of chess", "photosynthesis",
    "the French Revolution", "how compilers work", "black holes", "the causes of inflation",
    "how bees communicate", "plate tectonics", "the life of Marie Curie", "how the internet routes packets",
    "the difference between weather and climate",
]
STYLES = [
    "Explain {} to a ten-year-old.", "Write a short essay about {}.", "Give five surprising facts about {}.",
    "Summarise {} in one paragraph, then list three open questions.",
]
PROMPTS = [style.format(topic) for topic in TOPICS for style in STYLES]
