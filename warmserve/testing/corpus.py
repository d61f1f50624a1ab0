"""Text the fixture tokenizer is trained on.

Mostly English prose, dialogue, code and numbers, so that common words merge into single tokens,
plus accented Latin, Cyrillic, Greek, CJK, Hangul and emoji, which stay rare enough that their
multi-byte characters are split across several byte-level tokens: a detokenizer under test has to
cope with tokens that end in the middle of a UTF-8 sequence.
"""

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was a bright cold day in April, and the clocks were striking thirteen. The old lighthouse keeper
climbed the spiral stairs every evening, counting each of the one hundred and twelve steps, and lit
the lamp before the fishing boats returned to the harbour. Nobody in the village remembered a night
when the light had failed, although there were stories about a storm, long ago, that broke the glass.

In the morning the market filled with people selling bread, cheese, apples, onions and fresh fish.
Children ran between the stalls while their parents argued about prices. "Two for a dollar," said the
baker. "That is what you said yesterday, and the day before," answered a woman with a basket of eggs.
She laughed, paid him, and walked home along the river, where the water was green and slow.

Machine learning models are trained on large amounts of data. A language model predicts the next
token given the previous tokens; during inference the server keeps a cache of keys and values for
every layer so that each new token costs only one forward step. Batching many requests together keeps
the accelerator busy, and a scheduler decides which sequences run in each step. When memory runs out,
the scheduler may pause a request, free its blocks, and resume it later from the prompt.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a leap year? Answer: There are 366 days in a leap year.
Question: Who wrote the play Hamlet? Answer: William Shakespeare wrote Hamlet around 1600.
User: Can you help me write a short poem about the sea?
Assistant: Of course! Here is a short poem: The sea is wide, the sea is deep, it sings the sailors
off to sleep; it keeps its secrets, old and grey, and gives them back another day.

def fibonacci(n: int) -> list[int]:
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]

for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")

if (x > 0 && y < 100) { return x * y; } else { return -1; }
SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5;
{"id": 42, "name": "widget", "tags": ["red", "small"], "price": 19.99, "in_stock": true}

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 65536 3.14159 2.71828 1e-5 -273.15
On 12 March 2024 at 09:30 the meeting started; it ended at 11:45. The invoice total was $1,234.56
(including 20% tax). Call +1 (555) 010-9999 or write to hello@example.com before 2025-01-31.

Science notes: water boils at 100 degrees Celsius at sea level. Light travels at about 299,792
kilometres per second. The mitochondria is the powerhouse of the cell. Photosynthesis turns carbon
dioxide and water into sugar and oxygen, using the energy of sunlight.

A recipe: mix two cups of flour, one cup of sugar, three eggs and a pinch of salt. Bake for thirty
minutes at 180 degrees, then let the cake cool before you cut it. Serve with tea or coffee.

Travel log. We took the early train to the mountains, changed at a small station, and walked the last
five kilometres through the forest. The path was steep and muddy, but the view from the top was worth
every step: lakes, villages, and far away the white line of the glaciers under a clear blue sky.

History: the printing press made books cheaper, and ideas travelled faster than ever before. Ships
crossed oceans, cities grew, and new machines changed how people worked, ate, and lived together.

Français : Le café était déjà froid quand elle a ouvert la fenêtre. Où est la bibliothèque ? Très bien,
merci. Deutsch: Über den Wolken muss die Freiheit wohl grenzenlos sein. Grüße aus München, schöne
Straße. Español: ¿Dónde está la estación? El niño comió una piña en la mañana. Português: Não há
coração que não ame a canção. Tiếng Việt: Tôi yêu tiếng Việt, cảm ơn bạn rất nhiều.
Русский: Привет, как дела? Москва — столица России. Ελληνικά: Καλημέρα, τι κάνεις σήμερα;
中文：你好，世界！今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。
日本語：こんにちは、世界。東京は日本の首都です。ありがとうございます。
한국어: 안녕하세요, 세계! 오늘 날씨가 좋네요.
Emoji: 🙂 😀 🚀 🎉 ❤️ 👍🏽 🇫🇷 🐍 ☕ — symbols: € £ ¥ © ® ™ ° ± × ÷ → ← ∞ ≈ ≠ ≤ ≥ … « » “ ” ‘ ’
"""
