"""Generate `instructions.jsonl`: a few hundred short prompt/completion pairs, built here, deterministically.

Run `python -m client.data.make_instructions` to rewrite the file; the output depends only on this script.
Tasks: arithmetic, capital cities, word reversal, uppercasing, the next day of the week or month, opposites
and letter counting — short answers with a fixed style, so that a small adapter can learn them quickly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Netherlands": "Amsterdam", "Belgium": "Brussels", "Denmark": "Copenhagen",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Morocco": "Rabat", "Nigeria": "Abuja",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["apple", "river", "garden", "planet", "silver", "window", "rocket", "forest", "candle", "bridge", "dragon",
         "pencil", "summer", "orange", "travel", "basket", "castle", "guitar", "marble", "wonder", "yellow", "kitten",
         "market", "shadow", "thunder", "harbor", "lantern", "meadow", "puzzle", "violet"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "early": "late", "open": "closed", "full": "empty", "young": "old", "strong": "weak", "high": "low",
             "wet": "dry", "hard": "soft", "rich": "poor", "loud": "quiet"}


def examples(rng: random.Random) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for _ in range(100):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append({"prompt": f"What is {a} {op} {b}?", "completion": f"{a} {op} {b} = {value}."})
    for country, capital in CAPITALS.items():
        out.append({"prompt": f"What is the capital of {country}?", "completion": f"The capital of {country} is {capital}."})
        out.append({"prompt": f"Which country has {capital} as its capital?", "completion": f"{capital} is the capital of {country}."})
    for word in WORDS:
        out.append({"prompt": f"Reverse the word '{word}'.", "completion": f"'{word}' reversed is '{word[::-1]}'."})
        out.append({"prompt": f"Write '{word}' in uppercase.", "completion": f"{word.upper()}"})
        letter = rng.choice(sorted(set(word)))
        out.append({"prompt": f"How many times does the letter '{letter}' appear in '{word}'?",
                    "completion": f"The letter '{letter}' appears {word.count(letter)} time{'s' if word.count(letter) != 1 else ''} in '{word}'."})
    for i, day in enumerate(DAYS):
        out.append({"prompt": f"What day comes after {day}?", "completion": f"The day after {day} is {DAYS[(i + 1) % 7]}."})
        out.append({"prompt": f"What day comes before {day}?", "completion": f"The day before {day} is {DAYS[(i - 1) % 7]}."})
    for i, month in enumerate(MONTHS):
        out.append({"prompt": f"What month comes after {month}?", "completion": f"The month after {month} is {MONTHS[(i + 1) % 12]}."})
    for word, opposite in OPPOSITES.items():
        out.append({"prompt": f"What is the opposite of '{word}'?", "completion": f"The opposite of '{word}' is '{opposite}'."})
        out.append({"prompt": f"What is the opposite of '{opposite}'?", "completion": f"The opposite of '{opposite}' is '{word}'."})
    rng.shuffle(out)
    return out


def main(path: Path = Path(__file__).with_name("instructions.jsonl")) -> None:
    rows = examples(random.Random(0))
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
