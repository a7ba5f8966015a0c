"""``model.image_prior``: which image an answer starts in, read from the question and all of a sample's images at once.

The questions that compare images ("Which kettle is the odd one out?", "In which image is the car to the right of the
tree?") are decided by one choice, the image the answer names first, which the tiny LLM makes at about chance. This
head makes that choice on its own: a learned token per image (plus that image's number, so "image 3" in the question
can be matched) reads the question's words and then the image's tokens through a few one-way blocks; one
self-attention layer then compares the images' summaries (an odd one out is only odd beside the others) and each
gets a logit; with ``relations`` (`model.image_prior_places`) `WordPlaces` adds a score from where the question's
words are in each image relative to each other, and with ``contrast`` (`model.image_prior_contrast`) `WordContrast`
one from how each image differs from the others at those places. With ``cells`` (`model.image_prior_cells`)
`AnswerCells` also says where in each image the answer's first object is, with ``nowhere`` (`model.image_prior_nowhere`)
`NothingThere` the same from what each image has that another lacks, and with ``cells_mix``
(`model.image_prior_cells_mix`) `WhichCells` how much of the latter to read in place of the former. It reads the
frozen encoder's features and the question's ids (as the Q-Former reads them), nothing the LLM computes, so it trains
beside the mask decoder with its own loss and its own gradient clip, or alone (configs/tiny-prior.yaml). At generation `PrimaModel` re-weighs the
answer's first image reference by it (docs/MODEL.md, "Which image first: the image prior"; after a phrase with
`model.image_prior_after_phrase`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prima.model.grounding import OneWayBlock
from prima.model.square import position_in_sample, sincos_positions


@dataclass
class PriorReading:
    """What `ImagePrior.read` gives."""

    logits: torch.Tensor  # (B, K) over each sample's images, -inf past its count
    places: torch.Tensor | None  # (N, L', g * g) each of the first L' question words' attention over each image's cells
    cells: torch.Tensor | None  # (N, g * g + 1) `AnswerCells`' log-probabilities over each image's cells and "nowhere"
    nowhere: torch.Tensor | None = None  # (N, g * g + 1) `NothingThere`'s, the same outcomes
    mix: torch.Tensor | None = None  # (N,) `WhichCells`' weight on `NothingThere`'s cells, image by image


class ImagePrior(nn.Module):
    """Logits (B, K) over each sample's images (-inf past its count) from encoder features and question ids."""

    def __init__(
        self,
        channels: int,
        grid: int,
        vocab_size: int,
        max_words: int,
        max_images: int,
        dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 3,
        relations: bool = False,
        contrast: bool = False,
        cells: bool = False,
        cells_match: bool = False,
        nowhere: bool = False,
        cells_mix: bool = False,
        odd: bool = False,
    ):
        super().__init__()
        self.max_words = max_words
        self.token_proj = nn.Conv2d(channels, dim, 1)
        self.token_norm = nn.LayerNorm(dim)
        # fixed 2D sine-cosine positions after the norm: left-right reads off linearly, which comparing where two
        # objects are needs (with a learned table and two layers the prior hardly learnt `spatial-compare`;
        # docs/MODEL.md, "Which image first")
        self.register_buffer("token_pos", sincos_positions(grid, dim), persistent=False)
        self.words = nn.Embedding(vocab_size, dim)
        self.word_pos = nn.Parameter(torch.randn(max_words, dim) * 0.02)
        self.slots = nn.Parameter(torch.randn(max_images, dim) * 0.02)  # "image k": the reading token of image k
        self.layers = nn.ModuleList([OneWayBlock(dim, num_heads) for _ in range(num_layers)])
        self.compare = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.relations = WordPlaces(dim, grid) if relations else None
        if contrast and not relations:
            raise ValueError("the image prior's contrast reads the word places: it needs relations=True")
        self.contrast = WordContrast(channels, dim) if contrast else None
        self.cells = AnswerCells(dim, channels if cells_match else None) if cells else None
        self.nowhere = NothingThere(channels, dim) if nowhere else None
        if cells_mix and not (cells and nowhere):
            raise ValueError("the image prior's cells mix weighs the answer cells against NothingThere: it needs both")
        self.mix = WhichCells(dim) if cells_mix else None
        if odd and not nowhere:
            raise ValueError("the image prior's odd-image score reads NothingThere's places: it needs nowhere=True")
        self.odd = OddImage(dim) if odd else None

    def forward(
        self,
        features: torch.Tensor,
        image_sample_index: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The logits (B, K) of `read`."""
        return self.read(features, image_sample_index, question_ids, question_mask).logits

    def read(
        self,
        features: torch.Tensor,
        image_sample_index: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> PriorReading:
        """``features`` (N, C, g, g): the encoder's features at the token stride of the batch's N images, sample by
        sample; ``image_sample_index`` (N,) each image's sample; ``question_ids`` / ``question_mask`` (B, L): the
        questions, right-padded. The places are None without ``relations``, the cells without ``cells``, `NothingThere`'s
        distribution without ``nowhere`` and the weight between the two without ``cells_mix``."""
        b, n, dev = question_ids.shape[0], features.shape[0], features.device
        counts = torch.bincount(image_sample_index, minlength=b)
        slot = position_in_sample(image_sample_index)
        tokens = self.token_proj(features.to(self.token_proj.weight.dtype)).flatten(2).transpose(1, 2)
        content = self.token_norm(tokens)
        tokens = content + self.token_pos.to(tokens.dtype)
        length = min(question_ids.shape[1], self.max_words)
        ids = question_ids[image_sample_index, :length]
        present = question_mask[image_sample_index, :length].bool()
        x = torch.cat([self.slots[slot].unsqueeze(1), self.words(ids) + self.word_pos[:length]], dim=1)
        padding = torch.cat([present.new_zeros(n, 1), ~present], dim=1)
        words = None
        for i, layer in enumerate(self.layers):
            if i == len(self.layers) - 1:
                words = x[:, 1:]  # the question's words, having read the image (the last layer keeps the slot only)
            x = layer(x, tokens, padding, keep=1 if i == len(self.layers) - 1 else None)
        k = int(counts.max())
        summaries = x.new_zeros(b, k, x.shape[-1])
        summaries[image_sample_index, slot] = x[:, 0]
        absent = torch.arange(k, device=dev)[None, :] >= counts[:, None]
        compared = self.compare(summaries, src_key_padding_mask=absent)
        logits = self.head(self.norm(compared)).squeeze(-1).float()
        places = None
        if self.relations is not None:
            # the embeddings looked up again, not shared with the reading above: one shared lookup sums its gradient
            # in another order, and the shipped run would no longer be reproduced bit for bit
            related, places = self.relations(self.words(ids), words, content, present)
            if self.contrast is not None:
                cells = features.to(tokens.dtype).flatten(2).transpose(1, 2)
                related = related + self.contrast(places.detach(), cells, image_sample_index, words, present)
            logits = logits + logits.new_zeros(b, k).index_put((image_sample_index, slot), related.float())
        logits = logits.masked_fill(absent, float("-inf"))
        cells = nowhere = mix = None
        if self.cells is not None or self.nowhere is not None:  # both read each image's question reading, detached
            raw = features.flatten(2).transpose(1, 2)
            readings = compared[image_sample_index, slot].detach()
            if self.cells is not None:
                cells = self.cells(raw, tokens.detach(), readings, image_sample_index)
            if self.nowhere is not None:
                nowhere = self.nowhere(raw, readings, image_sample_index)
            if self.mix is not None:
                assert cells is not None and nowhere is not None
                mix = self.mix(readings, cells.detach(), nowhere.detach())
            if self.odd is not None:
                assert nowhere is not None
                odd = self.odd(raw, nowhere.detach(), readings, image_sample_index)
                logits = logits + logits.new_zeros(b, k).index_put((image_sample_index, slot), odd.float())
        return PriorReading(logits, places, cells, nowhere, mix)


class WordPlaces(nn.Module):
    """A score per image from where the question's words are in it, relative to each other.

    Each word finds itself among the image's cells (one attention, its query from the word, its keys from the cells)
    and the attention's centre of mass is where it is (a spatial soft-argmax: an explicit (x, y) in [-1, 1]). Every
    pair of words (a, b) then adds ``g_x (x_a - x_b) + g_y (y_a - y_b)`` to the image's score, the gates (g_x, g_y)
    an MLP of the two words: a relation network over the question's words with their places. "In which image is
    the chair to the left of the table?" needs exactly one such pair, weighted by the direction word. Neither a
    generic reader of the cells nor this one alone learnt that from thousands of samples; this one does once the
    places are taught where the answer's masks show the question's words (`model.loss.image_prior_places`;
    docs/MODEL.md, "Where the question's words are").
    """

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        axis = torch.linspace(-1.0, 1.0, grid)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("places", torch.stack([cols.flatten(), rows.flatten()], dim=1), persistent=False)
        self.gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.zeros_(self.gate[-1].weight)  # no say until it has learnt which pairs matter
        nn.init.zeros_(self.gate[-1].bias)

    def forward(
        self, names: torch.Tensor, words: torch.Tensor, cells: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``names`` (N, L, D) the question's word embeddings (what to look for), ``words`` (N, L, D) each image's
        reading of the question (what the pair means), ``cells`` (N, g * g, D) the image's cells without their
        positions, ``present`` (N, L) the real words: (N,) scores and (N, L, g * g) each word's attention over the
        cells (what `model.loss.image_prior_places` trains)."""
        scale = words.shape[-1] ** -0.5
        attention = torch.softmax(self.query(names) @ self.key(cells).transpose(1, 2) * scale, dim=-1)
        where = attention @ self.places.to(attention.dtype)  # (N, L, 2)
        delta = where[:, :, None] - where[:, None, :]  # (N, L, L, 2): word a's place minus word b's
        length = words.shape[1]
        pairs = torch.cat(
            [words[:, :, None].expand(-1, -1, length, -1), words[:, None, :].expand(-1, length, -1, -1)], dim=-1
        )
        both = (present[:, :, None] & present[:, None, :]).to(delta.dtype)
        return ((self.gate(pairs) * delta).sum(-1) * both).sum((1, 2)), attention


class WordContrast(nn.Module):
    """A score per image from how what it shows where a question word is differs from what the sample's other images
    show there: the odd one out.

    For each question word, the encoder's features at its place (the `WordPlaces` attention over the cells, read
    here, not trained: the answer's masks teach the places) describe that object in each image; an MLP embeds the
    description, and a learned weighting of its squared difference from the mean of the sample's other images is
    that word's score, gated by an MLP of the image's reading of the word ("Which mug is the odd one out?" weighs
    "mug"). "Each image shows a mug. Which mug is the odd one out?" needs exactly that one comparison; the prior's
    one comparison of whole-image summaries hardly learnt it (docs/MODEL.md, "What differs where the word is").
    """

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, dim), nn.GELU(), nn.Linear(dim, dim))
        self.distance = nn.Linear(dim, 1)
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.gate[-1].weight)  # no say until it has learnt which words matter
        nn.init.zeros_(self.gate[-1].bias)

    def forward(
        self,
        places: torch.Tensor,
        cells: torch.Tensor,
        image_sample_index: torch.Tensor,
        words: torch.Tensor,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """``places`` (N, L, g * g) each question word's attention over each image's cells, ``cells`` (N, g * g, C)
        the encoder's features, ``image_sample_index`` (N,) each image's sample, ``words`` (N, L, D) each image's
        reading of the question, ``present`` (N, L) the real words: (N,) scores."""
        described = self.embed(places @ cells)  # (N, L, D)
        b = int(image_sample_index.max()) + 1
        sums = described.new_zeros(b, *described.shape[1:]).index_add(0, image_sample_index, described)
        others = torch.bincount(image_sample_index, minlength=b)[image_sample_index] - 1
        mean = (sums[image_sample_index] - described) / others.clamp_min(1).to(described.dtype)[:, None, None]
        score = self.distance((described - mean) ** 2).squeeze(-1)  # (N, L); 0 weight for a sample of one image
        return (self.gate(words).squeeze(-1) * score * present.to(score.dtype) * (others > 0)[:, None]).sum(1)


class AnswerCells(nn.Module):
    """Where in its image the answer's first object is: log-probabilities over each image's cells, and "nowhere".

    "What is in image 3 but not in image 1?" is answered by the object of image 3 whose cells find no match among
    image 1's: the LLM names an object of the image at about chance there. Each cell is scored by an MLP of its token
    (the prior's, with its position), its image's reading of the question (after the comparison across images), and
    how well it is matched in the sample's other images: its best cosine similarity to a cell of each other image
    (the encoder's features), averaged with weights the other images' readings give (which image the question
    compares against: "image 1" above), and the least, greatest and mean of them. One more outcome per image, "the
    answer grounds nothing here" (an MLP of the reading and of those statistics' least and mean over the cells), is
    what an answer without a [SEG] ("Nothing: everything in image 3 is also in image 1.") teaches on every image of
    its sample; it learnt "not this image" rather than "nothing here" (measured), so nothing reads it at generation,
    and the distribution over the cells is renormalised without it there. It reads the prior's tokens and readings without training them (the prior's image choice trains as
    without it), and is trained by `model.loss.image_prior_cells`; at generation it re-ranks branches of the answer's
    first phrase by how much of it lies under that phrase's mask (docs/MODEL.md, "Where in the image: the answer's
    cells").
    """

    STATS = 4  # the matches' reference-weighted mean, least, greatest and mean

    def __init__(self, dim: int, channels: int | None = None):
        super().__init__()
        stats = self.STATS * (2 if channels else 1)
        self.reference = nn.Linear(dim, 1)
        self.score = nn.Sequential(nn.Linear(2 * dim + stats, dim), nn.GELU(), nn.Linear(dim, 1))
        self.nowhere = nn.Sequential(nn.Linear(dim + 2 * stats, dim), nn.GELU(), nn.Linear(dim, 1))
        # with ``channels``: the same statistics again from the cosine of learnt projections of the features
        self.match = nn.Linear(channels, dim) if channels else None

    def forward(
        self, cells: torch.Tensor, tokens: torch.Tensor, readings: torch.Tensor, image_sample_index: torch.Tensor
    ) -> torch.Tensor:
        """``cells`` (N, G, C) the encoder's features, ``tokens`` (N, G, D) the prior's tokens, ``readings`` (N, D)
        each image's reading of the question, ``image_sample_index`` (N,): (N, G + 1) log-probabilities, the last
        column "nowhere in this image"."""
        normed = F.normalize(cells.float(), dim=-1)
        reference = self.reference(readings).squeeze(-1).float()
        n, g = cells.shape[:2]
        spaces = [normed] if self.match is None else [normed, F.normalize(self.match(normed), dim=-1)]
        stats = normed.new_zeros(n, g, self.STATS * len(spaces))  # zeros for a sample of one image: no match
        for sample in torch.unique(image_sample_index).tolist():
            rows = (image_sample_index == sample).nonzero(as_tuple=True)[0]
            k = rows.numel()
            if k < 2:
                continue
            other = ~torch.eye(k, dtype=torch.bool, device=cells.device)
            weights = reference[rows][None, :].expand(k, k).masked_fill(~other, float("-inf")).softmax(-1)
            found = []
            for space in spaces:
                own = space[rows]  # (k, G, C)
                best = torch.einsum("agc,bhc->abgh", own, own).amax(-1)  # (k, k, G): a's cell g best matched in b
                others = best[other].view(k, k - 1, g)
                found += [(weights[:, :, None] * best).sum(1), others.amin(1), others.amax(1), others.mean(1)]
            stats[rows] = torch.stack(found, dim=-1)
        stats = stats.to(tokens.dtype)
        h = torch.cat([tokens, readings[:, None].expand(-1, g, -1), stats], dim=-1)
        nowhere = self.nowhere(torch.cat([readings, stats.amin(1), stats.mean(1)], dim=-1))
        return torch.cat([self.score(h).squeeze(-1), nowhere], dim=-1).float().log_softmax(-1)


class NothingThere(nn.Module):
    """Whether the answer grounds anything in an image at all, from what the image has that another image lacks.

    `AnswerCells`' "nowhere" learnt "not this image": it cannot tell "What is in image 3 but not in image 1?" answered
    by an object from the same question answered "Nothing", both start in image 3. Here image a is read against each
    other image b of its sample on its own: each cell of a is scored from its encoder features, those of its best
    match in b and that similarity (the cosine of learnt projections of the two: raw features match an object placed
    elsewhere poorly; by an MLP whose hidden layer the reading of the question of image a scales), and
    "nowhere" from the reading alone; the softmax over a's cells and "nowhere" against b is then mixed over b with
    weights from b's reading (which image the question compares against). Against the right b an object a alone has
    takes the mass, and where every cell is matched it stays on "nowhere". Trained as the cells are (the first
    [SEG]'s mask on its image, "nowhere" on every image of an answer without one; `model.loss.image_prior_nowhere`),
    reading the prior's readings detached, clipped on its own; at generation `model.image_prior_nowhere_below` reads
    it (docs/MODEL.md, "Nothing there").
    """

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.reference = nn.Linear(dim, 1)
        self.match = nn.Linear(channels, dim)  # cells are matched by the cosine of these projections (learnt)
        width = 2 * channels + 1
        self.cell = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU())
        self.scale = nn.Linear(dim, dim)  # the question's say in how a cell is read
        self.score = nn.Linear(dim, 1)
        self.nowhere = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, cells: torch.Tensor, readings: torch.Tensor, image_sample_index: torch.Tensor) -> torch.Tensor:
        """``cells`` (N, G, C) the encoder's features, ``readings`` (N, D) each image's reading of the question:
        (N, G + 1) log-probabilities, the last column "nothing in this image"."""
        normed = F.normalize(cells.float(), dim=-1).to(readings.dtype)
        keys = F.normalize(self.match(normed), dim=-1)
        n, g, _ = normed.shape
        nowhere = self.nowhere(readings)  # (N, 1)
        scale = 1 + self.scale(readings)  # (N, D)
        reference = self.reference(readings).squeeze(-1).float()
        out = normed.new_zeros(n, g + 1, dtype=torch.float32)
        for sample in torch.unique(image_sample_index).tolist():
            rows = (image_sample_index == sample).nonzero(as_tuple=True)[0]
            k = rows.numel()
            own, key = normed[rows], keys[rows]  # (k, G, C), (k, G, D)
            if k < 2:  # nothing to compare with: a cell is read as if matched nowhere
                x = torch.cat([own, torch.zeros_like(own), own.new_zeros(k, g, 1)], dim=-1)[:, None]
                weights = own.new_ones(k, 1)
            else:
                best, where = torch.einsum("agc,bhc->abgh", key, key).max(-1)  # (k, k, G): a's cell g matched in b
                found = own[torch.arange(k, device=own.device)[None, :, None], where]  # (k, k, G, C)
                other = ~torch.eye(k, dtype=torch.bool, device=own.device)
                x = torch.cat([own[:, None].expand(-1, k, -1, -1), found, best[..., None]], dim=-1)[other]
                x = x.view(k, k - 1, g, -1)
                weights = reference[rows][None, :].expand(k, k)[other].view(k, k - 1).softmax(-1)
            h = self.cell(x) * scale[rows][:, None, None]  # (k, k', G, D)
            against = torch.cat([self.score(h).squeeze(-1), nowhere[rows][:, None].expand(-1, x.shape[1], -1)], -1)
            mixed = against.float().log_softmax(-1) + weights.float().clamp_min(1e-30).log()[..., None]
            out[rows] = mixed.logsumexp(1)
        return out


def mix_cells(cells: torch.Tensor, nowhere: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """`AnswerCells`' and `NothingThere`'s log-probabilities (N, G + 1) mixed over each image's cells, geometrically
    and renormalised: ``weight`` (a number, or (N,) one per image) of `NothingThere`'s, the rest the cells'. The last
    column, "nowhere", stays the cells' (nothing reads it at generation)."""
    if not torch.is_tensor(weight):
        weight = cells.new_tensor(float(weight))
    w = weight.to(cells.dtype).reshape(-1, 1)
    where = (1 - w) * cells[:, :-1].log_softmax(-1) + w * nowhere[:, :-1].log_softmax(-1)
    return torch.cat([where.log_softmax(-1), cells[:, -1:]], dim=-1)


class WhichCells(nn.Module):
    """How much of `NothingThere`'s distribution over an image's cells to read in place of `AnswerCells`', image by
    image: a weight in (0, 1) from the image's reading of the question and how sure each distribution is.

    `NothingThere` finds the object of a question that compares images ("What is in image 3 but not in image 1?")
    far more often than the cells, and the cells that of one that does not ("What could you sit on?") a little more
    often; one fixed weight for every question trades between them (docs/MODEL.md, "Which cells, question by
    question"). Trained by the cells' loss of the mixture (`mix_cells`; `model.loss.image_prior_cells_mix`), reading
    both distributions and the readings detached, clipped on its own.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weigh = nn.Sequential(nn.Linear(dim + 5, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.weigh[-1].weight)  # half of each until it has learnt which to trust
        nn.init.zeros_(self.weigh[-1].bias)

    def forward(self, readings: torch.Tensor, cells: torch.Tensor, nowhere: torch.Tensor) -> torch.Tensor:
        """``readings`` (N, D) each image's reading of the question, ``cells`` / ``nowhere`` (N, G + 1) the two heads'
        log-probabilities: (N,) the weight on `NothingThere`'s."""
        p, q = cells[:, :-1].float().softmax(-1), nowhere[:, :-1].float().softmax(-1)
        sure = [
            p.amax(-1),
            q.amax(-1),
            -(p * p.clamp_min(1e-12).log()).sum(-1),
            -(q * q.clamp_min(1e-12).log()).sum(-1),
        ]
        agree = (p * q).sqrt().sum(-1)  # their overlap (the Bhattacharyya coefficient)
        x = torch.cat([readings.float(), torch.stack([*sure, agree], dim=-1)], dim=-1).to(readings.dtype)
        return torch.sigmoid(self.weigh(x).squeeze(-1).float())


class OddImage(nn.Module):
    """A score per image from how much what it shows where `NothingThere` finds a difference differs from what the
    sample's other images show there: which image is the odd one out.

    `NothingThere` finds where an image differs from the others ("Each image shows the same chair, but in one image a
    part of it has another colour": the part), but not which image is odd, since the difference is the same both ways
    (docs/MODEL.md, "Which image is odd"). Here each image is described by the encoder's features (normalised) pooled
    under its own `NothingThere` distribution, its oddness is its mean distance to the other images' descriptions,
    standardised over the sample's images, and a gate from the sample's readings of the question (mean over its
    images) scales it: how much the question asks for the odd image. Trained by the prior's image loss on the logits
    it adds to, reading `NothingThere` and the readings detached, clipped on its own, over a finished prior (stage 4's
    `train.train_only`; trained beside the prior, that loss would move the prior too).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.gate[-1].weight)  # no say until it has learnt which questions ask for the odd image
        nn.init.zeros_(self.gate[-1].bias)

    def forward(
        self, cells: torch.Tensor, nowhere: torch.Tensor, readings: torch.Tensor, image_sample_index: torch.Tensor
    ) -> torch.Tensor:
        """``cells`` (N, G, C) the encoder's features, ``nowhere`` (N, G + 1) `NothingThere`'s log-probabilities,
        ``readings`` (N, D) each image's reading of the question: (N,) scores (0 in a sample of fewer than 3
        images, where no image is odd)."""
        place = nowhere[:, :-1].float().softmax(-1)
        described = torch.einsum("ng,ngc->nc", place, F.normalize(cells.float(), dim=-1))
        b = int(image_sample_index.max()) + 1
        counts = torch.bincount(image_sample_index, minlength=b)
        question = readings.new_zeros(b, readings.shape[-1]).index_add(0, image_sample_index, readings)
        gate = self.gate(question / counts.clamp_min(1)[:, None].to(readings.dtype)).squeeze(-1).float()  # (B,)
        z = place.new_zeros(cells.shape[0])
        for sample in torch.unique(image_sample_index).tolist():
            rows = (image_sample_index == sample).nonzero(as_tuple=True)[0]
            k = rows.numel()
            if k < 3:
                continue
            oddness = torch.cdist(described[rows], described[rows]).sum(1) / (k - 1)
            z[rows] = (oddness - oddness.mean()) / (oddness.std() + 1e-6)
        return gate[image_sample_index] * z  # in the graph even where every z is 0
