"""Teacher text for compression: the default model writes about many everyday topics.

Recovery after pruning, QAT and distillation need text in the teacher's own
distribution (the "self-data" used to recover pruned models); the project ships
little general text, and the held-out set (data/general/text.jsonl) must stay held out.
Seeded sampling, 3 prompt styles x 120 topics; regenerate with
  python data/compress/make_teacher_text.py   (about 5 minutes on 2 cores)
The output depends on the model's numerics, so it is committed rather than rebuilt in CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOPICS = """the water cycle; volcanoes; how bread rises; the history of the bicycle; honey bees; tides and the moon;
photosynthesis; the printing press; how vaccines work; coral reefs; the Roman aqueducts; glaciers; compost;
the invention of paper; migrating birds; lighthouses; how a refrigerator works; the Silk Road; earthquakes;
rainbows; the human heart; chess openings; the first airplanes; rain forests; how soap cleans; the postal service;
wind turbines; the history of tea; octopuses; deserts at night; how maps are made; the solar system; bridges;
clocks and timekeeping; the immune system; recycling plastic; mushrooms; the Olympic games; lightning; trains;
how the internet carries messages; penguins; the alphabet; batteries; caves; the ancient library of Alexandria;
the moon landing; sleep; gardening in spring; how glass is made; whales; the metric system; snowflakes;
the history of coffee; ants; public libraries; how a camera works; the Great Wall; fossils; hot air balloons;
learning a second language; the stock market; cheese making; elephants; the telescope; calendars; hurricanes;
how pianos make sound; the French revolution; kites; bees and flowers; the Sahara; electric cars; the brain;
origami; marathons; the printing of money; friendship; healthy breakfast; the Amazon river; dinosaurs; radio;
how ships float; the first computers; volunteering; the Arctic; saving energy at home; museums; wolves;
the history of medicine; board games; salt; rivers and deltas; writing a good letter; the periodic table; owls;
city parks; the invention of the telephone; yoga; tornadoes; the Renaissance; bamboo; stars and constellations;
teamwork; the life of a tree; pottery; the history of music; clouds; robots in factories; street food;
the human skeleton; budgeting money; the ocean floor; teaching children to read; castles; seasons; insects""".replace("\n", " ")
STYLES = ["Write a short informative paragraph about {t}.", "Explain {t} to a curious teenager.",
          "Tell me three interesting facts about {t}, in full sentences."]


def main(out: str = "data/compress/teacher_text.jsonl") -> None:
    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.models import load_model

    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    prompts = [s.format(t=t) for t in topics for s in STYLES]
    model, tok = load_model("default", dtype="bf16")
    rows = []
    for i in range(0, len(prompts), 40):
        chunk = prompts[i:i + 40]
        res = generate(model, tok, chunk, GenerationConfig(max_new_tokens=160, do_sample=True, temperature=0.7,
                                                           seed=i, chat=True))
        rows += [{"prompt": p, "text": t.strip()} for p, t in zip(chunk, res.texts) if len(t.split()) >= 20]
        print(f"{len(rows)} texts", file=sys.stderr)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} texts to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
