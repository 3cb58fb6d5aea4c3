"""Writes chat.jsonl, eval.jsonl and tasks.jsonl of this example (run: python make_data.py).

chat.jsonl teaches one distinctive answer format: a short explanation, then a last line
"Answer: X". eval.jsonl holds other questions of the same kinds (held out, for the loss before
and after). tasks.jsonl is unrelated general knowledge, asked as multiple choice, to show that
fine-tuning on the format did not cost the model what it knew.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("China", "Beijing"),
            ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
            ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Cuba", "Havana")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("early", "late"),
             ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("old", "young"),
             ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"), ("rich", "poor"), ("near", "far")]
ANIMALS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
           ("lion", "roar"), ("horse", "neigh"), ("pig", "oink"), ("frog", "croak")]
WORDS = ["planet", "river", "garden", "window", "orange", "library", "mountain", "pencil", "bridge", "island",
         "candle", "forest", "rocket", "yellow", "teacher", "kitchen", "market", "silver", "winter", "dolphin"]
PLURALS = [("child", "children"), ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"), ("person", "people"),
           ("woman", "women"), ("goose", "geese"), ("leaf", "leaves"), ("knife", "knives"), ("box", "boxes")]
SYSTEMS = ["Be concise.", "You are a careful tutor.", "Answer the user's question."]


def arithmetic(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    op = rng.choice(["+", "-", "*"])
    if op == "+":
        return f"What is {a} + {b}?", f"Adding {a} and {b} gives {a + b}.", a + b
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"Taking {b} away from {a} leaves {a - b}.", a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} multiplied by {b} is {a * b}.", a * b


def capital(rng):
    country, city = rng.choice(CAPITALS)
    q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
    return q, f"The capital of {country} is {city}.", city


def opposite(rng):
    word, other = rng.choice(OPPOSITES)
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{other}'.", other


def animal(rng):
    name, sound = rng.choice(ANIMALS)
    return f"What sound does a {name} make?", f"A {name} says '{sound}'.", sound


def letters(rng):
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", f"'{word}' is spelled {'-'.join(word)}, which is {len(word)} letters.", len(word)


def larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is greater than {min(a, b)}.", max(a, b)


def minutes(rng):
    h = rng.randint(2, 9)
    return f"How many minutes are in {h} hours?", f"An hour has 60 minutes, so {h} hours have {60 * h} minutes.", 60 * h


def plural(rng):
    word, many = rng.choice(PLURALS)
    return f"What is the plural of '{word}'?", f"The plural of '{word}' is '{many}'.", many


KINDS = [arithmetic, capital, opposite, animal, letters, larger, minutes, plural]


def turn(rng):
    question, explanation, answer = rng.choice(KINDS)(rng)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"{explanation}\nAnswer: {answer}"}]


def conversations(rng, n):
    seen, out = set(), []
    while len(out) < n:
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.2 else []
        for _ in range(2 if rng.random() < 0.25 else 1):  # some conversations go on for a second question
            messages += turn(rng)
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            out.append({"messages": messages})
    return out


TASKS = [
    ("What do bees make?", ["honey", "milk", "glass", "paper"], 0),
    ("Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice", "salt"], 2),
    ("How many legs does a spider have?", ["six", "four", "ten", "eight"], 3),
    ("What gas do plants take in from the air?", ["carbon dioxide", "helium", "neon", "hydrogen"], 0),
    ("Which ocean is the largest?", ["Atlantic", "Pacific", "Indian", "Arctic"], 1),
    ("What is the main language spoken in Brazil?", ["Spanish", "French", "Portuguese", "Italian"], 2),
    ("Which organ pumps blood through the body?", ["the liver", "the lungs", "the brain", "the heart"], 3),
    ("What do you call a baby cat?", ["a kitten", "a puppy", "a calf", "a foal"], 0),
    ("Which season comes after summer?", ["spring", "autumn", "winter", "monsoon"], 1),
    ("What color do you get by mixing blue and yellow?", ["purple", "orange", "green", "pink"], 2),
    ("Which instrument has black and white keys?", ["violin", "drum", "flute", "piano"], 3),
    ("What is the boiling point of water at sea level in Celsius?", ["100 degrees", "50 degrees", "0 degrees", "200 degrees"], 0),
    ("Who wrote the play Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
    ("Which animal is the largest mammal?", ["elephant", "giraffe", "blue whale", "hippopotamus"], 2),
    ("What do caterpillars turn into?", ["frogs", "birds", "spiders", "butterflies"], 3),
    ("Which star is at the center of our solar system?", ["the Sun", "Sirius", "Polaris", "Vega"], 0),
    ("What is the tallest mountain on Earth?", ["K2", "Mount Everest", "Mont Blanc", "Kilimanjaro"], 1),
    ("What do you use to write on a blackboard?", ["a spoon", "a brush", "chalk", "soap"], 2),
    ("How many days are in a week?", ["five", "ten", "six", "seven"], 3),
]


def main():
    rng = random.Random(19)
    train = conversations(rng, 360)
    asked = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    held_out = [c for c in conversations(random.Random(2026), 400)  # questions chat.jsonl never asks
                if not any(m["content"] in asked for m in c["messages"] if m["role"] == "user")][:40]
    for name, rows in (("chat.jsonl", train), ("eval.jsonl", held_out)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "tasks.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                              for q, c, a in TASKS))


if __name__ == "__main__":
    main()
