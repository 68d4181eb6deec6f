"""The built-in task's requests (written for this project), their splits, and task v2's steering.

Requests: 6 groups x 3 templates x 24 subjects = 432 ("Describe your day at the dentist.", "Write a
short review of a cheap umbrella.", ...) whose replies can go either way in sentiment. A request's
split is fixed by a hash of its text, so adding requests never moves old ones between splits.
"""
from __future__ import annotations

import hashlib

# Task v2 samples every request's replies under these system instructions in turn, so that a request's
# replies range from glowing to sour (pairs with small and large gold differences). The reward model
# never sees them: a pair's prompt is the plain request.
STEERING = ("You are a cheerful assistant. Answer with warm, enthusiastic, positive words.",
            "You are a grumpy assistant. Answer with harsh, negative, disappointed words.",
            "")  # "": the model's own default system prompt

PROMPT_GROUPS: list[tuple[list[str], list[str]]] = [
    (["Describe your day at {}.",
      "Write a short diary entry about a visit to {}.",
      "Tell a friend how your trip to {} went."],
     ["the beach", "the dentist", "a crowded airport", "a job interview", "the zoo", "a rainy music festival",
      "your grandmother's house", "a new gym", "the DMV", "an amusement park", "a quiet library",
      "a hospital waiting room", "a wedding", "a campsite in the mountains", "a busy train station",
      "a farmers' market", "an escape room", "a science museum", "a run-down hotel", "a ski resort",
      "a hair salon", "a football stadium", "a cooking class", "the post office"]),
    (["Write a short review of {}.",
      "Write a customer comment about {} you tried last month.",
      "What do you think of {}?"],
     ["a secondhand bicycle", "a cheap umbrella", "a new smartphone", "a noisy blender", "a pair of running shoes",
      "an electric toothbrush", "a robot vacuum cleaner", "a budget laptop", "a scented candle", "a smartwatch",
      "a coffee maker", "a mattress delivered in a box", "a video game console", "a pair of wireless earbuds",
      "an air fryer", "a paperback novel", "a winter coat", "a desk lamp", "a kids' scooter", "a camping tent",
      "a set of kitchen knives", "a meal-kit subscription", "a streaming service", "a language-learning app"]),
    (["Describe how you felt during {}.",
      "Write a short message to a friend about {}.",
      "Write two sentences about {}."],
     ["a surprise birthday party", "a delayed flight", "your first day at a new job", "a power outage",
      "a long weekend with friends", "losing your keys", "a thunderstorm at night", "moving to a new city",
      "a family reunion", "a traffic jam on the highway", "a graduation ceremony", "a failed cooking experiment",
      "a marathon", "a job rejection", "adopting a puppy", "a flat tire", "a snow day",
      "a concert by your favorite band", "a group project at school", "a long hospital stay",
      "winning a small prize", "a holiday dinner", "a missed train", "a first date"]),
    (["Describe the taste of {}.",
      "Write a restaurant review that mentions {}.",
      "Would you recommend {}? Answer in a few sentences."],
     ["a bowl of ramen", "cold pizza", "a vegan burger", "hospital food", "homemade apple pie", "airline food",
      "a spicy curry", "burnt toast", "fresh sushi", "instant noodles", "a chocolate cake",
      "a salad with no dressing", "street tacos", "a school cafeteria lunch", "grilled salmon",
      "a gas-station sandwich", "french fries", "a green smoothie", "leftover soup", "a fancy tasting menu",
      "pancakes", "black coffee", "a fruit salad", "microwave popcorn"]),
    (["What do you think about {}?",
      "Write a short opinion about {}.",
      "Give your honest opinion of {}."],
     ["working from home", "Monday mornings", "public transport in big cities", "social media", "online shopping",
      "homework", "winter", "summer vacations", "self-driving cars", "video calls", "reality TV",
      "open-plan offices", "learning to code", "long commutes", "electric cars", "group chats", "rainy days",
      "living in a small town", "fast fashion", "board games", "gardening", "standardized tests",
      "smartphones for kids", "traveling alone"]),
    (["Write a short review of {}.",
      "Summarize your opinion of {} in a few sentences.",
      "Tell me what you liked or disliked about {}."],
     ["a horror movie you watched recently", "a long fantasy novel", "a children's cartoon", "a jazz concert",
      "a stand-up comedy show", "a documentary about the ocean", "a video game sequel", "a Broadway musical",
      "a podcast about history", "a romantic comedy", "a poetry reading", "an art exhibition",
      "a superhero movie", "a cooking show", "a true-crime series", "a classical music album", "a school play",
      "a mystery novel", "a nature documentary", "an online course", "a magic show", "a science fiction series",
      "a local band's first album", "a museum audio tour"]),
]


def all_prompts() -> list[str]:
    """Every request of the task, in a fixed order (group, then subject, then template)."""
    prompts = [template.format(subject) for templates, subjects in PROMPT_GROUPS
               for subject in subjects for template in templates]
    if len(set(prompts)) != len(prompts):
        raise AssertionError("PROMPT_GROUPS produces duplicate prompts")
    return prompts


def split_of(prompt: str, test_share: int = 1) -> str:
    """A prompt's split, from a hash of its text into ten buckets: 1 dev, `test_share` test, the rest
    train (task v1: 8/1/1; task v2: 7/1/2, for a test split of over 1,000 pairs)."""
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "train" if bucket < 9 - test_share else "dev" if bucket == 9 - test_share else "test"
