"""The steering demo: make the default model talk about cold weather.

    interplab demo [--out runs/cold-minus-hot]

1. Continue "The weather in California is" (greedy, raw text: no chat template, so that the
   continuation is the model's plain next-token prediction for this sentence).
2. Build a "cold minus hot" vector by mean difference (CAA) at one layer from a small
   built-in contrast set: the same weather prompts completed with a cold and a hot
   description, activations averaged over the completion tokens.
3. Continue the prompt again with the vector added at every position, at a few scales,
   printing the next-token probability of cold and of hot words before and after.

Also holds the small built-in data sets the tests and docs use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from interplab.steering.datasets import ContrastDataset, ContrastPair

DEMO_PROMPT = "The weather in California is"
DEMO_LAYER = 7
DEMO_SCALES = (2.0, 3.0, 4.0, -3.0)

# (prompt, cold completion, hot completion): the contrast set for "cold minus hot"
COLD_HOT = (
    ("The weather today is", " freezing cold, with snow and ice everywhere.", " scorching hot, with blazing sun everywhere."),
    ("Outside, the air feels", " icy and bitter, so we wear heavy coats.", " hot and humid, so we wear light shirts."),
    ("This week it has been", " chilly and frosty every single morning.", " warm and sunny every single morning."),
    ("The forecast says it will be", " cold enough to freeze the lake.", " hot enough to melt the asphalt."),
    ("Last night the town was", " snowy, and the wind was frigid.", " muggy, and the wind was sweltering."),
    ("In January the mountains are", " covered in snow and bitterly cold.", " covered in sunshine and baking hot."),
    ("When we stepped outside it was", " so cold that our breath froze.", " so hot that our shoes melted."),
    ("The climate there is", " cold and wintry most of the year.", " hot and tropical most of the year."),
)
COLD_WORDS = (" cold", " freezing", " chilly", " cool", " snowy", " icy", " frigid", " frosty", " colder",
              " wintry", " bitter")
HOT_WORDS = (" hot", " warm", " sunny", " mild", " scorching", " sweltering", " humid", " balmy", " warmer",
             " tropical", " sunshine")

# (question, cold answer, hot answer): an A/B set in CAA's format, "matching" = the cold answer
HOT_COLD_QUESTIONS = (
    ("What does fresh snow feel like to touch?", "Cold and wet", "Hot and dry"),
    ("How does an ice cube feel in your hand?", "Freezing cold", "Burning hot"),
    ("What is the weather usually like in Antarctica?", "Freezing, with ice everywhere", "Hot, with blazing sunshine"),
    ("What should you wear on a snowy winter day?", "A thick coat, gloves and a scarf", "Shorts, a tank top and sandals"),
    ("How does water from a glacier feel?", "Icy cold", "Warm like a bath"),
    ("What is the North Pole like in January?", "Dark and bitterly cold", "Sunny and tropical"),
    ("How does a frozen lake feel if you touch it?", "Cold and hard", "Hot and soft"),
    ("What is a freezer used for?", "Keeping food frozen and cold", "Cooking food until it is hot"),
    ("What happens to a puddle on a very cold night?", "It freezes into ice", "It boils away"),
    ("What kind of drink is iced tea?", "A cold drink", "A hot drink"),
    ("What is the temperature of the ice on a skating rink?", "Below freezing", "Above boiling"),
    ("How does the air feel on a winter morning in Canada?", "Chilly and crisp", "Hot and sticky"),
    ("What do polar bears live on?", "Sea ice in the cold Arctic", "Hot desert sand"),
    ("What is a snowman made of?", "Cold packed snow", "Warm sand from the beach"),
    ("How does the wind feel during a blizzard?", "Freezing and biting", "Warm and gentle"),
    ("What does a refrigerator do to food?", "It keeps it cold", "It makes it hot"),
    ("What is the top of Mount Everest like?", "Frozen and extremely cold", "Hot and humid"),
    ("What does frost on a window mean about the temperature outside?", "It is below freezing", "It is a heat wave"),
    ("What is ice cream like when it comes out of the freezer?", "Cold and frozen", "Hot and melted"),
    ("What is the weather like in Siberia in winter?", "Extremely cold and snowy", "Hot and sunny"),
)


def cold_hot_pairs() -> ContrastDataset:
    """The demo's contrast set: positive = cold completion, negative = hot completion."""
    pairs = tuple(ContrastPair(cold, hot, prompt) for prompt, cold, hot in COLD_HOT)
    return ContrastDataset(pairs, kind="prompt_completion", source="interplab built-in cold/hot pairs")


def hot_cold_ab(*, balanced: bool = True) -> ContrastDataset:
    """The hot/cold questions as CAA A/B items (matching behaviour = the cold answer).

    balanced=True alternates which letter holds the cold answer (as CAA's sets do);
    balanced=False always puts it in (A), so the score also measures a letter preference.
    """
    items = []
    for index, (question, cold, hot) in enumerate(HOT_COLD_QUESTIONS):
        cold_first = not balanced or index % 2 == 0
        first, second = (cold, hot) if cold_first else (hot, cold)
        text = f"{question}\n\nChoices:\n(A) {first}\n(B) {second}"
        matching, other = ("(A)", "(B)") if cold_first else ("(B)", "(A)")
        items.append(ContrastPair(matching, other, text))
    name = "balanced" if balanced else "cold answer always (A)"
    return ContrastDataset(tuple(items), kind="ab", source=f"interplab built-in hot/cold A/B ({name})")


def ab_items_as_json(dataset: ContrastDataset) -> list[dict]:
    """A/B items in the CAA repository's JSON layout."""
    return [{"question": p.prompt, "answer_matching_behavior": p.positive,
             "answer_not_matching_behavior": p.negative} for p in dataset.pairs]


def word_probabilities(model, prompt: str, *word_lists: Sequence[str]) -> list[float]:
    """For each word list, the total next-token probability of its words' first tokens after
    `prompt` (raw text, no chat template), under whatever interventions are active."""
    tokenizer = model.require_tokenizer()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model.hf(**{k: v.to(model.device) for k, v in enc.items()}, use_cache=False).logits
    probs = logits[0, -1].float().softmax(-1)
    out = []
    for words in word_lists:
        ids = sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})
        out.append(float(probs[ids].sum()))
    return out


@dataclass(frozen=True)
class DemoRow:
    scale: float
    text: str
    p_cold: float
    p_hot: float


@dataclass
class DemoResult:
    prompt: str
    layer: int
    rows: list[DemoRow] = field(default_factory=list)
    """Scale 0 first (the baseline), then each steered scale."""
    seconds: float = 0.0
    vector: object = None
    """The "cold minus hot" SteeringVector that was built (save it with `.vector.save(folder)`)."""

    def __repr__(self) -> str:
        cells = ", ".join(f"{r.scale:+g}: cold share {r.p_cold / max(r.p_cold + r.p_hot, 1e-12):.0%}"
                          for r in self.rows)
        return f"DemoResult(layer {self.layer}, {len(self.rows)} rows [{cells}], {self.seconds:.1f} s)"


def run_demo(model=None, *, layer: int = DEMO_LAYER, scales: Sequence[float] = DEMO_SCALES,
             max_new_tokens: int = 20, prompt: str = DEMO_PROMPT,
             out: Callable[[str], None] | None = print) -> DemoResult:
    """Baseline vs steered continuations of `prompt` with a "cold minus hot" vector."""
    from interplab.generation import generate
    from interplab.models.loading import load
    from interplab.steering.evaluate import check_scales
    from interplab.steering.extract import extract_vector

    scales = check_scales(scales)
    say = out or (lambda text: None)
    start = time.perf_counter()
    model = load() if model is None else model
    result = DemoResult(prompt, layer)

    def measure(scale: float) -> DemoRow:
        text = generate(model, prompt, max_new_tokens=max_new_tokens, chat=False)[0]
        row = DemoRow(scale, text, *word_probabilities(model, prompt, COLD_WORDS, HOT_WORDS))
        label = "baseline" if scale == 0 else f"steered, scale {scale:+g}"
        say(f"[{label}] {prompt}{' ' if text[:1].isspace() else ''}{' '.join(text.split())}")
        say(f"    P(cold words) = {row.p_cold:.4f}   P(hot words) = {row.p_hot:.4f}   "
            f"cold share = {row.p_cold / max(row.p_cold + row.p_hot, 1e-12):.0%}")
        return row

    result.rows.append(measure(0.0))
    vector = extract_vector(model, cold_hot_pairs(), layers=[layer], read="mean", holdout=0.0, chat=False).vector
    result.vector = vector
    say(f"built 'cold minus hot' at blocks.{layer}.hook_resid_post from {len(COLD_HOT)} pairs "
        f"(mean difference over completion tokens; norm {vector.norms()[layer]:.1f})")
    for scale in scales:
        with vector.apply(model, layers=[layer], scale=scale):
            result.rows.append(measure(scale))
    result.seconds = time.perf_counter() - start
    say(f"done in {result.seconds:.1f} s")
    return result
