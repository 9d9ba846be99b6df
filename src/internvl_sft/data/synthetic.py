"""Embedded default dataset: deterministic synthetic mobile-UI screens with InternVL UI-task annotations.

The files written have the layout and sample format of the real `ui-dataset`, so later stages cannot tell
the two apart. Each screen is drawn from a random generator seeded by (seed, split, index): a screen does
not change when the number of screens does.

The dataset is built to be learnable by a tiny random-init model in minutes. Every target has a coarse,
fixed visual cue (brand colour of an app icon, colour and shape of a navigation icon, colour of a list-row
marker, the fixed look of the search box and button), every screen kind is obvious at a glance (icon grid,
list page, on-screen keyboard, suggestion panel, result cards), while positions vary from screen to screen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class App:
    name: str
    caption: str  # Latin caption under the icon: the embedded font has no CJK glyphs
    colour: RGB


@dataclasses.dataclass(frozen=True)
class NavTab:
    label: str
    caption: str
    colour: RGB
    shape: str


@dataclasses.dataclass(frozen=True)
class RowLabel:
    label: str
    colour: RGB


APPS = (
    App("微信", "WeChat", (7, 193, 96)),
    App("淘宝", "Taobao", (255, 96, 0)),
    App("知乎", "Zhihu", (23, 100, 246)),
    App("微博", "Weibo", (214, 24, 40)),
    App("美团", "Meituan", (255, 208, 0)),
    App("抖音", "Douyin", (24, 24, 32)),
    App("支付宝", "Alipay", (0, 190, 222)),
    App("京东", "JD", (150, 60, 210)),
    App("高德地图", "Amap", (140, 86, 40)),
    App("哔哩哔哩", "Bilibili", (251, 124, 170)),
)
FILLER_ICONS = (
    ("Clock", (150, 154, 162)),
    ("Notes", (200, 202, 208)),
    ("Files", (98, 106, 118)),
    ("Camera", (176, 178, 184)),
    ("Mail", (126, 130, 140)),
    ("Photos", (222, 224, 228)),
)
NAV_TABS = (
    NavTab("首页", "Home", (226, 48, 48), "house"),
    NavTab("发现", "Discover", (0, 140, 255), "circle"),
    NavTab("消息", "Chats", (0, 176, 80), "bubble"),
    NavTab("我的", "Me", (136, 64, 208), "diamond"),
    NavTab("视频", "Video", (255, 136, 0), "triangle"),
    NavTab("购物车", "Cart", (120, 78, 40), "square"),
    NavTab("关注", "Follow", (236, 64, 170), "star"),
)
ROW_LABELS = (
    RowLabel("工作群", (230, 60, 60)),
    RowLabel("家人", (255, 150, 0)),
    RowLabel("快递", (214, 196, 0)),
    RowLabel("天气", (90, 190, 40)),
    RowLabel("音乐", (0, 170, 140)),
    RowLabel("新闻", (0, 150, 230)),
    RowLabel("相册", (50, 80, 220)),
    RowLabel("日程", (140, 70, 220)),
    RowLabel("笔记", (220, 60, 200)),
    RowLabel("外卖", (130, 90, 60)),
)
SEARCH_TERMS = (
    "北京大学", "百年孤独", "火锅", "天气预报", "机械键盘", "咖啡",
    "电影票", "运动鞋", "周杰伦", "猫粮", "地铁", "耳机",
)

PAGE_BACKGROUND: RGB = (244, 244, 246)
RESULTS_BACKGROUND: RGB = (232, 232, 236)
SEARCH_BOX_FILL: RGB = (255, 255, 255)
SEARCH_BOX_BORDER: RGB = (120, 120, 128)
SEARCH_BOX_FOCUS_BORDER: RGB = (0, 122, 255)
SEARCH_BUTTON_FILL: RGB = (0, 128, 128)
RESULT_CARD_FILL: RGB = (255, 255, 255)
SUGGESTION_PANEL_FILL: RGB = (255, 246, 214)
KEYBOARD_FILL: RGB = (206, 210, 216)
KEY_FILL: RGB = (252, 252, 252)
TEXT_DARK: RGB = (60, 60, 66)
TEXT_LIGHT: RGB = (176, 176, 182)
WHITE: RGB = (255, 255, 255)

PORTRAIT_SIZES = ((240, 520), (240, 480), (270, 600), (250, 540))
OTHER_SIZES = ((400, 520), (520, 240), (360, 360))
SCREEN_KIND_WEIGHTS = {"home": 0.30, "page": 0.34, "keyboard": 0.14, "typed": 0.11, "results": 0.11}
SAMPLES_PER_SCREEN_WEIGHTS = {1: 0.1, 2: 0.2, 3: 0.7}
E2E_PER_SCREEN = 0.78  # mean 2.6 samples a screen: e2e is 30% of the samples
ACTOR_SHARE_OF_REST = 0.45 / 0.70

PROMPT_PREFIX = "<image>\n请根据屏幕截图，"
ACTOR_TASK = "执行任务："
GROUNDING_TASK = "定位："
E2E_OPEN, E2E_CLOSE = "输出“", "”的下一步操作"
CLICK, LONG_PRESS, SWIPE, TYPE = "点击", "长按", "滑动", "输入"
SEARCH_BOX, SEARCH_BUTTON, FIRST_RESULT = "搜索框", "搜索按钮", "第一条搜索结果"
SWIPE_UP, SWIPE_DOWN = "向上滑动页面", "向下滑动页面"
SWIPE_LEFT, SWIPE_RIGHT = "向左滑动页面", "向右滑动页面"


def app_icon_phrase(app: str) -> str:
    return f"{app}app图标"


def nav_tab_phrase(label: str) -> str:
    return f"底部导航栏的“{label}”选项"


def row_phrase(label: str) -> str:
    return f"“{label}”条目"


def type_task(text: str) -> str:
    return f"在搜索框中输入“{text}”"


def search_goal(app: str, term: str) -> str:
    return f"用{app}搜索“{term}”"


def search_and_open_goal(app: str, term: str) -> str:
    return f"用{app}搜索“{term}”并打开第一个结果"


def open_goal(app: str) -> str:
    return f"打开{app}"


def _unique(strings: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(strings))


LEXICON: tuple[str, ...] = _unique((
    PROMPT_PREFIX, "<image>", "\n", "请根据屏幕截图，", ACTOR_TASK, GROUNDING_TASK, E2E_OPEN, E2E_CLOSE,
    CLICK, LONG_PRESS, SWIPE, TYPE, "操作：", "参数：", SEARCH_BOX, SEARCH_BUTTON, FIRST_RESULT,
    SWIPE_UP, SWIPE_DOWN, SWIPE_LEFT, SWIPE_RIGHT,
    "app图标", "底部导航栏的“", "”选项", "”条目", "在搜索框中输入“", "用", "搜索“", "并打开第一个结果", "打开",
    *(app.name for app in APPS), *(tab.label for tab in NAV_TABS), *(row.label for row in ROW_LABELS),
    *SEARCH_TERMS, *"0123456789", "“", "”", "[", "]", "[[", "]]", ",", " ", ", ", " -> ", "->",
))

# The questions of the tiny base's grounding pre-training (model/pretrain_tiny.py), upstream style; a base
# pre-trained that way has its tokenizer trained on the lexicon and these.
BOX_QUERY, POINT_QUERY = "框出", "指出"
GROUNDED_LEXICON: tuple[str, ...] = (*LEXICON, BOX_QUERY, POINT_QUERY, "<ref>", "</ref>", "<box>", "</box>")


@dataclasses.dataclass(frozen=True)
class Element:
    """A target drawn on a screen: `box` holds pixel bounds (x2, y2 exclusive), `colour` its fill at the centre."""

    box: Box
    colour: RGB

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclasses.dataclass(frozen=True)
class Screen:
    """A rendered screen, its targets (keys `app:微信`, `nav:发现`, `row:家人`, `search_box`,
    `search_button`, `first_result`), the band (x1, y1, x2, y2) a swipe scrolls and the query typed."""

    kind: str
    image: Image.Image
    app: App | None
    elements: dict[str, Element]
    scroll_band: Box | None
    query: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclasses.dataclass(frozen=True)
class Sample:
    """One conversation; `target` names the element it refers to (None for typing and swipes)."""

    family: str
    prompt: str
    answer: str
    target: str | None = None


# ---------------------------------------------------------------- drawing primitives


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(size, 6))


def blend(colour: RGB, other: RGB, amount: float) -> RGB:
    r, g, b = (round(c + (o - c) * amount) for c, o in zip(colour, other))
    return r, g, b


def random_colour(rng: random.Random, low: int, high: int) -> RGB:
    return rng.randint(low, high), rng.randint(low, high), rng.randint(low, high)


def _text_colour_on(fill: RGB) -> RGB:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return TEXT_DARK if luminance > 170 else WHITE


def draw_text_bar(draw: ImageDraw.ImageDraw, x: float, y: float, width: float, height: float, fill: RGB) -> None:
    """A rounded bar standing in for a line of text."""
    draw.rounded_rectangle((x, y, x + max(width, height), y + height), radius=height / 2, fill=fill)


def _caption(draw: ImageDraw.ImageDraw, cx: float, top: float, text: str, size: int, fill: RGB) -> None:
    draw.text((cx, top), text, font=_font(size), fill=fill, anchor="mt")


def draw_magnifier(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill: RGB, u: float) -> None:
    """A ring with a handle; the ring's hole keeps the centre pixel in the background colour."""
    width = max(2, round(2 * u))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=width)
    reach = radius * 0.7
    draw.line((cx + reach, cy + reach, cx + reach + radius * 0.8, cy + reach + radius * 0.8), fill=fill, width=width)


def _status_bar(draw: ImageDraw.ImageDraw, width: int, height: int, fill: RGB | None, ink: RGB, rng: random.Random,
                u: float) -> None:
    if fill is not None:
        draw.rectangle((0, 0, width - 1, height - 1), fill=fill)
    clock = f"{rng.randint(7, 23)}:{rng.randint(0, 59):02d}"
    draw.text((8 * u, height / 2), clock, font=_font(round(10 * u)), fill=ink, anchor="lm")
    right = width - 8 * u
    draw.rectangle((right - 16 * u, height / 2 - 4 * u, right, height / 2 + 4 * u), outline=ink, width=1)
    draw.rectangle((right - 14 * u, height / 2 - 2 * u, right - 14 * u + rng.randint(4, 12) * u,
                    height / 2 + 2 * u), fill=ink)
    for bar in range(4):
        x = right - 40 * u + bar * 4 * u
        draw.rectangle((x, height / 2 + 4 * u - (bar + 1) * 2 * u, x + 2 * u, height / 2 + 4 * u), fill=ink)


def draw_nav_icon(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    """Draws a navigation icon that always covers its centre point."""
    if shape == "house":
        draw.rectangle((cx - 0.8 * r, cy - 0.2 * r, cx + 0.8 * r, cy + r), fill=fill)
        draw.polygon([(cx - r, cy - 0.2 * r), (cx, cy - 1.1 * r), (cx + r, cy - 0.2 * r)], fill=fill)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "bubble":
        draw.rounded_rectangle((cx - r, cy - 0.8 * r, cx + r, cy + 0.7 * r), radius=0.3 * r, fill=fill)
        draw.polygon([(cx - 0.5 * r, cy + 0.6 * r), (cx - 0.6 * r, cy + 1.1 * r), (cx, cy + 0.6 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - 1.1 * r), (cx + 1.1 * r, cy), (cx, cy + 1.1 * r), (cx - 1.1 * r, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx - 0.7 * r, cy - r), (cx + r, cy), (cx - 0.7 * r, cy + r)], fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = 1.15 * r if k % 2 == 0 else 0.5 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown navigation icon shape {shape!r}")


# ---------------------------------------------------------------- home screen


def _scale(width: int, height: int) -> float:
    """Size unit: 1 on a 240-px wide phone; short screens get smaller parts so a list still fits."""
    return min(max(min(width / 240, height / 360), 0.8), 1.2)


def _wallpaper(image: Image.Image, rng: random.Random) -> RGB:
    draw = ImageDraw.Draw(image)
    top = random_colour(rng, 60, 200)
    bottom = blend(top, random_colour(rng, 40, 220), 0.8)
    width, height = image.size
    for y in range(height):
        draw.line((0, y, width - 1, y), fill=blend(top, bottom, y / max(height - 1, 1)))
    return bottom


def _widget(draw: ImageDraw.ImageDraw, width: int, top: float, rows: int, cell_h: float, fill: RGB,
            rng: random.Random, u: float) -> None:
    """A clock (one row) or weather card (two rows) above the icon grid, so icons start at varying heights."""
    bottom = top + rows * cell_h - 8 * u
    if rows == 1:
        clock = f"{rng.randint(7, 23)}:{rng.randint(0, 59):02d}"
        draw.text((width / 2, top + 4 * u), clock, font=_font(round(30 * u)), fill=WHITE, anchor="mt")
        draw_text_bar(draw, width / 2 - 30 * u, bottom - 12 * u, 60 * u, 6 * u, WHITE)
        return
    draw.rounded_rectangle((12 * u, top + 4 * u, width - 12 * u, bottom), radius=12 * u, fill=fill)
    draw_text_bar(draw, 24 * u, top + 16 * u, 60 * u, 14 * u, TEXT_DARK)
    draw_text_bar(draw, 24 * u, top + 40 * u, 90 * u, 7 * u, TEXT_LIGHT)
    draw.ellipse((width - 64 * u, top + 18 * u, width - 28 * u, top + 54 * u), fill=(255, 200, 40))


def _home_slots(width: int, height: int, rng: random.Random, u: float,
                draw: ImageDraw.ImageDraw, dock_fill: RGB) -> tuple[list[tuple[float, float]], int, Box]:
    """Draws the widget, page dots and dock; returns the icon-centre slots (grid in reading order, then
    the dock from the returned index on) and the grid band."""
    status_h = round(18 * u)
    cols = max(4, int((width - 16 * u) // (60 * u)))
    cell_w, cell_h = (width - 16 * u) / cols, 66 * u
    dock_h = round(62 * u)
    dock_top = height - dock_h - round(6 * u)
    grid_top = status_h + round(10 * u)
    grid_bottom = dock_top - round(18 * u)
    rows = max(1, int((grid_bottom - grid_top) // cell_h))
    widget_rows = rng.choices((0, 1, 2), weights=(0.4, 0.3, 0.3))[0] if rows >= 4 else 0
    if widget_rows:
        _widget(draw, width, grid_top, widget_rows, cell_h, blend(dock_fill, WHITE, 0.3), rng, u)
    dots_y = dock_top - 10 * u
    for k in range(3):
        x = width / 2 + (k - 1) * 10 * u
        fill = WHITE if k == 0 else blend(dock_fill, (90, 90, 90), 0.4)
        draw.ellipse((x - 2.5 * u, dots_y - 2.5 * u, x + 2.5 * u, dots_y + 2.5 * u), fill=fill)
    draw.rounded_rectangle((8 * u, dock_top, width - 8 * u, dock_top + dock_h), radius=18 * u, fill=dock_fill)
    slots = [(8 * u + (c + 0.5) * cell_w, grid_top + r * cell_h + 24 * u)
             for r in range(widget_rows, rows) for c in range(cols)]
    dock_start = len(slots)
    dock_cols = min(cols, 5)
    dock_w = (width - 16 * u) / dock_cols
    slots += [(8 * u + (c + 0.5) * dock_w, dock_top + dock_h / 2) for c in range(dock_cols)]
    return slots, dock_start, (0, grid_top, width, grid_bottom)


def _draw_icon(draw: ImageDraw.ImageDraw, cx: float, cy: float, size: int, fill: RGB, caption: str | None,
               u: float) -> Box:
    x1, y1 = round(cx - size / 2), round(cy - size / 2)
    box = (x1, y1, x1 + size, y1 + size)
    draw.rounded_rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), radius=size / 4.5, fill=WHITE)
    draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=size / 5, fill=fill)
    if caption is not None:
        _caption(draw, cx + 0.5, box[3] + 2 * u, caption, round(8 * u), WHITE)
    return box


def _icon_slots(slots: int, dock_start: int, icons: int, rng: random.Random) -> list[int]:
    """Slot indices for `icons` icons: the dock first, then grid cells in reading order with random gaps."""
    dock = list(range(dock_start, slots))
    grid = [cell for cell in range(dock_start) if rng.random() > 0.25]
    chosen = (dock + grid)[:icons]
    rng.shuffle(chosen)
    return chosen


def render_home(width: int, height: int, rng: random.Random) -> Screen:
    """Wallpaper, a grid of app icons in shuffled order (with fillers and gaps) and a dock."""
    u = _scale(width, height)
    image = Image.new("RGB", (width, height))
    dock_fill = blend(_wallpaper(image, rng), WHITE, 0.45)
    draw = ImageDraw.Draw(image)
    _status_bar(draw, width, round(18 * u), None, WHITE, rng, u)
    slots, dock_start, band = _home_slots(width, height, rng, u, draw, dock_fill)
    apps = rng.sample(APPS, rng.randint(min(6, len(slots)), min(len(APPS), len(slots))))
    fillers = rng.sample(FILLER_ICONS, min(rng.randint(2, len(FILLER_ICONS)), len(slots) - len(apps)))
    icons: list[tuple[str | None, str, RGB]] = [(app.name, app.caption, app.colour) for app in apps]
    icons += [(None, caption, colour) for caption, colour in fillers]
    icon_size = round(38 * u)
    elements: dict[str, Element] = {}
    for slot, (name, caption, colour) in zip(_icon_slots(len(slots), dock_start, len(icons), rng), icons):
        cx, cy = slots[slot]
        box = _draw_icon(draw, cx, cy, icon_size, colour, caption if slot < dock_start else None, u)
        if name is not None:
            elements[f"app:{name}"] = Element(box, colour)
    return Screen("home", image, None, elements, band)


# ---------------------------------------------------------------- app pages


@dataclasses.dataclass(frozen=True)
class _PageLayout:
    u: float
    status_h: int
    title_bottom: int
    tab_strip: bool
    banner_h: int
    search_top: int
    search_h: int
    content_top: int
    nav_top: int
    keyboard_top: int


def _page_layout(width: int, height: int, kind: str, rng: random.Random) -> _PageLayout:
    """Vertical layout with a random tab strip and banner, so the search box sits at varying heights."""
    u = _scale(width, height)
    status_h, title_h, search_h = round(18 * u), round(40 * u), round(34 * u)
    nav_top = height - round(52 * u)
    keyboard_top = height - round(height * (0.5 if width > height else 0.4))
    tab_strip = rng.random() < 0.4
    top = status_h + title_h + (round(28 * u) if tab_strip else 0)
    room_below = 2 * round(48 * u) if kind != "keyboard" else 0
    limit = min(nav_top - room_below, keyboard_top - round(8 * u)) - round(16 * u) - search_h
    banners = [h for h in (0, round(56 * u), round(112 * u)) if top + h <= limit]
    banner_h = rng.choice(banners or [0])
    search_top = top + banner_h + round(8 * u)
    return _PageLayout(u, status_h, status_h + title_h, tab_strip, banner_h, search_top, search_h,
                       search_top + search_h + round(8 * u), nav_top, keyboard_top)


def _title_bar(draw: ImageDraw.ImageDraw, width: int, layout: _PageLayout, app: App, rng: random.Random) -> None:
    u = layout.u
    ink = _text_colour_on(app.colour)
    draw.rectangle((0, 0, width - 1, layout.title_bottom - 1), fill=app.colour)
    _status_bar(draw, width, layout.status_h, None, ink, rng, u)
    cy = (layout.status_h + layout.title_bottom) / 2
    draw.line((16 * u, cy - 6 * u, 10 * u, cy), fill=ink, width=max(2, round(2 * u)))
    draw.line((10 * u, cy, 16 * u, cy + 6 * u), fill=ink, width=max(2, round(2 * u)))
    draw.text((width / 2, cy), app.caption, font=_font(round(13 * u)), fill=ink, anchor="mm")
    for k in range(3):
        x = width - 14 * u - k * 5 * u
        draw.ellipse((x - 1.5 * u, cy - 1.5 * u, x + 1.5 * u, cy + 1.5 * u), fill=ink)


def _tab_strip(draw: ImageDraw.ImageDraw, width: int, layout: _PageLayout, app: App, rng: random.Random) -> None:
    u = layout.u
    top = layout.title_bottom
    draw.rectangle((0, top, width - 1, top + round(28 * u) - 1), fill=WHITE)
    count = rng.randint(3, 4)
    for k in range(count):
        cx = (k + 0.5) * width / count
        bar_w = rng.randint(22, 34) * u
        draw_text_bar(draw, cx - bar_w / 2, top + 10 * u, bar_w, 7 * u, TEXT_DARK if k == 0 else TEXT_LIGHT)
        if k == 0:
            draw.rectangle((cx - bar_w / 2, top + 23 * u, cx + bar_w / 2, top + 26 * u), fill=app.colour)


def _banner(draw: ImageDraw.ImageDraw, width: int, layout: _PageLayout, rng: random.Random) -> None:
    u = layout.u
    top = layout.search_top - round(8 * u) - layout.banner_h
    fill = random_colour(rng, 170, 235)
    draw.rounded_rectangle((10 * u, top + 6 * u, width - 10 * u, top + layout.banner_h - 2 * u), radius=10 * u,
                           fill=fill)
    draw_text_bar(draw, 22 * u, top + 18 * u, rng.randint(50, 90) * u, 10 * u, blend(fill, TEXT_DARK, 0.7))
    if layout.banner_h > 80 * u:
        draw_text_bar(draw, 22 * u, top + 38 * u, rng.randint(60, 110) * u, 6 * u, blend(fill, WHITE, 0.6))
        draw.ellipse((width - 70 * u, top + 30 * u, width - 24 * u, top + 76 * u), fill=blend(fill, WHITE, 0.5))


def _search_row(draw: ImageDraw.ImageDraw, width: int, layout: _PageLayout, query: str | None,
                focused: bool) -> dict[str, Element]:
    """The search box (white, outlined, magnifier at the left) and the teal search button at its right."""
    u = layout.u
    top, bottom = layout.search_top, layout.search_top + layout.search_h
    button_w = round(52 * u)
    button = (width - round(10 * u) - button_w, top, width - round(10 * u), bottom)
    box = (round(10 * u), top, button[0] - round(6 * u), bottom)
    border = SEARCH_BOX_FOCUS_BORDER if focused else SEARCH_BOX_BORDER
    draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=8 * u, fill=SEARCH_BOX_FILL,
                           outline=border, width=max(2, round(2 * u)))
    cy = (top + bottom) / 2
    draw_magnifier(draw, box[0] + 14 * u, cy - 1 * u, 5 * u, SEARCH_BOX_BORDER, u)
    text_left = box[0] + 26 * u
    text_room = box[0] + 0.45 * (box[2] - box[0]) - text_left
    if query is None:
        draw_text_bar(draw, text_left, cy - 3 * u, text_room * 0.8, 6 * u, TEXT_LIGHT)
    else:
        draw_text_bar(draw, text_left, cy - 4 * u, min(len(query) * 9 * u, text_room), 8 * u, TEXT_DARK)
    if focused:
        draw.line((text_left - 2 * u, cy - 8 * u, text_left - 2 * u, cy + 8 * u), fill=SEARCH_BOX_FOCUS_BORDER, width=2)
    draw.rounded_rectangle((button[0], button[1], button[2] - 1, button[3] - 1), radius=8 * u, fill=SEARCH_BUTTON_FILL)
    draw_magnifier(draw, (button[0] + button[2]) / 2, cy, 7 * u, WHITE, u)
    return {"search_box": Element(box, SEARCH_BOX_FILL), "search_button": Element(button, SEARCH_BUTTON_FILL)}


def _list_rows(draw: ImageDraw.ImageDraw, width: int, top: int, bottom: int, visible_bottom: int, u: float,
               rng: random.Random) -> dict[str, Element]:
    """Rows tinted in their label's colour with a saturated avatar marker; only fully visible rows are targets."""
    row_h, gap = round(44 * u), round(4 * u)
    labels = rng.sample(ROW_LABELS, len(ROW_LABELS))
    elements: dict[str, Element] = {}
    y = top
    for label in labels:
        if y + row_h > bottom:
            break
        box = (round(8 * u), y, width - round(8 * u), y + row_h)
        fill = blend(label.colour, WHITE, 0.72)
        draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=6 * u, fill=fill)
        cy = y + row_h / 2
        draw.ellipse((box[0] + 8 * u, cy - 13 * u, box[0] + 34 * u, cy + 13 * u), fill=label.colour)
        text_room = box[0] + 0.44 * (box[2] - box[0]) - (box[0] + 42 * u)
        muted = blend(fill, TEXT_DARK, 0.35)
        draw_text_bar(draw, box[0] + 42 * u, y + 11 * u, text_room * rng.uniform(0.5, 1.0), 7 * u, TEXT_DARK)
        draw_text_bar(draw, box[0] + 42 * u, y + 27 * u, text_room * rng.uniform(0.4, 0.9), 5 * u, muted)
        draw_text_bar(draw, box[2] - 30 * u, y + 11 * u, 20 * u, 5 * u, muted)
        if y + row_h <= visible_bottom:
            elements[f"row:{label.label}"] = Element(box, fill)
        y += row_h + gap
    return elements


def _result_cards(draw: ImageDraw.ImageDraw, width: int, top: int, bottom: int, u: float,
                  rng: random.Random) -> dict[str, Element]:
    """White cards with a square thumbnail; the first one is the target."""
    card_h, gap = round(64 * u), round(6 * u)
    elements: dict[str, Element] = {}
    y = top + round(2 * u)
    while y + card_h <= bottom:
        box = (round(8 * u), y, width - round(8 * u), y + card_h)
        draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=6 * u, fill=RESULT_CARD_FILL)
        thumb = random_colour(rng, 90, 220)
        draw.rectangle((box[0] + 6 * u, y + 6 * u, box[0] + 58 * u, y + card_h - 6 * u), fill=thumb)
        text_left = box[0] + 66 * u
        text_room = box[0] + 0.44 * (box[2] - box[0]) - text_left
        draw_text_bar(draw, text_left, y + 10 * u, text_room * rng.uniform(0.6, 1.0), 7 * u, TEXT_DARK)
        draw_text_bar(draw, text_left, y + 24 * u, text_room * rng.uniform(0.4, 0.9), 5 * u, TEXT_LIGHT)
        draw_text_bar(draw, text_left, y + 44 * u, 28 * u, 8 * u, (232, 64, 48))
        if not elements:
            elements["first_result"] = Element(box, RESULT_CARD_FILL)
        y += card_h + gap
    return elements


def _suggestion_panel(draw: ImageDraw.ImageDraw, width: int, top: int, bottom: int, u: float,
                      rng: random.Random) -> None:
    draw.rectangle((0, top - round(4 * u), width - 1, bottom), fill=SUGGESTION_PANEL_FILL)
    y = top + 6 * u
    while y + 24 * u <= bottom:
        draw_magnifier(draw, 20 * u, y + 10 * u, 4 * u, TEXT_LIGHT, u)
        draw_text_bar(draw, 36 * u, y + 7 * u, rng.randint(40, 110) * u, 6 * u, TEXT_DARK)
        y += 32 * u


def _nav_bar(draw: ImageDraw.ImageDraw, width: int, height: int, top: int, u: float,
             rng: random.Random) -> dict[str, Element]:
    """Three to five tabs in random order; each tab cell is a target, its icon covers the cell centre."""
    tabs = rng.sample(NAV_TABS, rng.randint(3, 5))
    draw.rectangle((0, top, width - 1, height - 1), fill=WHITE)
    draw.line((0, top, width - 1, top), fill=(214, 214, 220), width=1)
    elements: dict[str, Element] = {}
    for k, tab in enumerate(tabs):
        box = (round(k * width / len(tabs)), top, round((k + 1) * width / len(tabs)), height)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        draw_nav_icon(draw, tab.shape, cx, cy - 2 * u, 10 * u, tab.colour)
        _caption(draw, cx, cy + 12 * u, tab.caption, round(8 * u), TEXT_DARK if k == 0 else (130, 130, 136))
        elements[f"nav:{tab.label}"] = Element(box, tab.colour)
    return elements


def _keyboard(draw: ImageDraw.ImageDraw, width: int, height: int, top: int, u: float) -> None:
    """The on-screen keyboard: a big grey block with white keys."""
    draw.rectangle((0, top, width - 1, height - 1), fill=KEYBOARD_FILL)
    draw.rectangle((0, top, width - 1, top + round(22 * u)), fill=(226, 228, 232))
    rows = (10, 9, 9, 5)
    row_h = (height - top - 26 * u) / len(rows)
    key_w = (width - 8 * u) / 10
    for r, count in enumerate(rows):
        y1 = top + 24 * u + r * row_h + 2 * u
        y2 = y1 + row_h - 5 * u
        if r < 3:
            left = 4 * u + (10 - count) * key_w / 2
            for k in range(count):
                x = left + k * key_w
                draw.rounded_rectangle((x + 1.5 * u, y1, x + key_w - 1.5 * u, y2), radius=3 * u, fill=KEY_FILL)
            continue
        draw.rounded_rectangle((4 * u, y1, 4 * u + 2 * key_w - 3 * u, y2), radius=3 * u, fill=(172, 178, 188))
        draw.rounded_rectangle((4 * u + 2 * key_w, y1, width - 4 * u - 2 * key_w - 3 * u, y2), radius=3 * u,
                               fill=KEY_FILL)
        draw.rounded_rectangle((width - 4 * u - 2 * key_w, y1, width - 4 * u, y2), radius=3 * u,
                               fill=(172, 178, 188))


def render_page(width: int, height: int, kind: str, rng: random.Random) -> Screen:
    """An app page: `page` (list), `keyboard` (search focused), `typed` (query + suggestions), `results`."""
    app = rng.choice(APPS)
    layout = _page_layout(width, height, kind, rng)
    u = layout.u
    background = RESULTS_BACKGROUND if kind == "results" else PAGE_BACKGROUND
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    _title_bar(draw, width, layout, app, rng)
    if layout.tab_strip:
        _tab_strip(draw, width, layout, app, rng)
    if layout.banner_h:
        _banner(draw, width, layout, rng)
    query = rng.choice(SEARCH_TERMS) if kind in ("typed", "results") else None
    elements = _search_row(draw, width, layout, query, focused=kind == "keyboard")
    content_top = layout.content_top
    if kind in ("page", "keyboard") and rng.random() < 0.5:
        draw_text_bar(draw, 12 * u, content_top + 4 * u, rng.randint(30, 60) * u, 6 * u, TEXT_LIGHT)
        content_top += round(18 * u)
    content_bottom = layout.nav_top - round(4 * u)
    scroll_band: Box | None = (0, content_top, width, content_bottom)
    if kind == "typed":
        _suggestion_panel(draw, width, content_top, layout.nav_top - 1, u, rng)
        scroll_band = None
    elif kind == "results":
        elements |= _result_cards(draw, width, content_top, content_bottom, u, rng)
    else:
        visible_bottom = layout.keyboard_top if kind == "keyboard" else content_bottom
        elements |= _list_rows(draw, width, content_top, content_bottom, visible_bottom, u, rng)
    if kind == "keyboard":
        _keyboard(draw, width, height, layout.keyboard_top, u)
        scroll_band = None
    else:
        elements |= _nav_bar(draw, width, height, layout.nav_top, u, rng)
    return Screen(kind, image, app, elements, scroll_band, query)


def render_screen(seed: int, split: str, index: int) -> tuple[Screen, random.Random]:
    """The screen `index` of `split`, and the generator (already advanced) that picks its samples."""
    rng = random.Random(f"ui-dataset:{seed}:{split}:{index}")
    kind = _weighted_choice(rng, SCREEN_KIND_WEIGHTS)
    portrait = rng.random() < 0.8
    width, height = rng.choice(PORTRAIT_SIZES if portrait else OTHER_SIZES)
    screen = render_home(width, height, rng) if kind == "home" else render_page(width, height, kind, rng)
    return screen, rng


# ---------------------------------------------------------------- samples


def _weighted_choice(rng: random.Random, weights: dict[T, float]) -> T:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _point(screen: Screen, x: float, y: float) -> tuple[int, int]:
    width, height = screen.size
    return round(1000 * x / width), round(1000 * y / height)


def _point_answer(action: str, point: tuple[int, int]) -> str:
    return f"操作：{action}\n参数：[{point[0]}, {point[1]}]"


def _element_answer(screen: Screen, action: str, key: str) -> str:
    return _point_answer(action, _point(screen, *screen.elements[key].centre))


def _box_answer(screen: Screen, key: str) -> str:
    x1, y1, x2, y2 = screen.elements[key].box
    p1, p2 = _point(screen, x1, y1), _point(screen, x2, y2)
    return f"[[{p1[0]}, {p1[1]}, {p2[0]}, {p2[1]}]]"


def _swipe_answer(screen: Screen, band: Box, direction: str) -> str:
    """Swipe across the middle 60% of the scroll band: up means the finger moves up."""
    x1, y1, x2, y2 = band
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    near_y, far_y = y1 + 0.2 * (y2 - y1), y1 + 0.8 * (y2 - y1)
    near_x, far_x = x1 + 0.2 * (x2 - x1), x1 + 0.8 * (x2 - x1)
    start, end = {
        SWIPE_UP: ((cx, far_y), (cx, near_y)),
        SWIPE_DOWN: ((cx, near_y), (cx, far_y)),
        SWIPE_LEFT: ((far_x, cy), (near_x, cy)),
        SWIPE_RIGHT: ((near_x, cy), (far_x, cy)),
    }[direction]
    (sx, sy), (ex, ey) = _point(screen, *start), _point(screen, *end)
    return f"操作：{SWIPE}\n参数：[{sx}, {sy}] -> [{ex}, {ey}]"


def _keys(screen: Screen, prefix: str) -> list[str]:
    return [key for key in screen.elements if key.startswith(prefix)]


def element_name(key: str) -> str:
    """What an element is called: `app:微信` -> `微信`, `search_box` -> `搜索框`."""
    kind, _, name = key.partition(":")
    return name or {"search_box": SEARCH_BOX, "search_button": SEARCH_BUTTON, "first_result": FIRST_RESULT}[kind]


def target_phrase(key: str) -> str:
    """How a task names an element: `app:微信` -> `微信app图标`, `search_box` -> `搜索框`."""
    kind, _, name = key.partition(":")
    phrases = {"app": app_icon_phrase, "nav": nav_tab_phrase, "row": row_phrase}
    return phrases[kind](name) if kind in phrases else element_name(key)


def _actor(screen: Screen, action: str, key: str) -> Sample:
    prompt = f"{PROMPT_PREFIX}{ACTOR_TASK}{action}{target_phrase(key)}"
    return Sample("actor", prompt, _element_answer(screen, action, key), key)


def _swipes(screen: Screen, directions: Sequence[str]) -> list[Sample]:
    if screen.scroll_band is None:
        return []
    return [Sample("actor", f"{PROMPT_PREFIX}{ACTOR_TASK}{d}", _swipe_answer(screen, screen.scroll_band, d))
            for d in directions]


def _actor_categories(screen: Screen) -> dict[str, tuple[float, list[Sample]]]:
    """Actor candidates grouped by kind of task, each group with its weight."""
    def clicks(prefix: str) -> list[Sample]:
        return [_actor(screen, CLICK, key) for key in _keys(screen, prefix)]

    presses = [_actor(screen, LONG_PRESS, key) for key in _keys(screen, "row:")]
    typing = [Sample("actor", f"{PROMPT_PREFIX}{ACTOR_TASK}{type_task(term)}", f"操作：{TYPE}\n参数：{term}")
              for term in SEARCH_TERMS]
    if screen.kind == "home":
        return {"app": (4.0, clicks("app:")), "swipe": (1.0, _swipes(screen, (SWIPE_LEFT, SWIPE_RIGHT)))}
    weights = {
        "page": {"box": 1.0, "button": 1.0, "nav": 1.5, "press": 2.5, "row": 0.5, "swipe": 1.0, "type": 1.0},
        "keyboard": {"box": 0.5, "button": 1.0, "press": 1.0, "row": 0.3, "type": 2.0},
        "typed": {"box": 1.0, "button": 2.0, "nav": 1.5},
        "results": {"box": 0.5, "button": 0.5, "nav": 1.0, "result": 2.0, "swipe": 1.0},
    }[screen.kind]
    groups = {"box": clicks("search_box"), "button": clicks("search_button"), "nav": clicks("nav:"),
              "press": presses, "row": clicks("row:"), "swipe": _swipes(screen, (SWIPE_UP, SWIPE_DOWN)),
              "type": typing, "result": clicks("first_result")}
    return {name: (weight, groups[name]) for name, weight in weights.items()}


def _grounding_categories(screen: Screen) -> dict[str, tuple[float, list[Sample]]]:
    def locate(prefix: str) -> list[Sample]:
        return [Sample("grounding", f"{PROMPT_PREFIX}{GROUNDING_TASK}{target_phrase(key)}", _box_answer(screen, key),
                       key) for key in _keys(screen, prefix)]

    return {"app": (1.0, locate("app:")), "box": (1.0, locate("search_box")),
            "button": (1.0, locate("search_button")), "nav": (1.5, locate("nav:")),
            "row": (1.5, locate("row:")), "result": (1.5, locate("first_result"))}


def _e2e_sample(screen: Screen, rng: random.Random) -> Sample:
    """A goal and its next step, which depends on the goal and on the screen state."""
    def sample(goal: str, answer: str, target: str | None) -> Sample:
        return Sample("e2e", f"{PROMPT_PREFIX}{E2E_OPEN}{goal}{E2E_CLOSE}", answer, target)

    term = screen.query or rng.choice(SEARCH_TERMS)
    if screen.kind == "home":
        key = rng.choice(_keys(screen, "app:"))
        app = key.partition(":")[2]
        goal = rng.choice((search_goal(app, term), search_and_open_goal(app, term), open_goal(app)))
        return sample(goal, _element_answer(screen, CLICK, key), key)
    if screen.app is None:
        raise ValueError(f"a {screen.kind!r} screen needs an app")
    app = screen.app.name
    if screen.kind == "results":
        return sample(search_and_open_goal(app, term), _element_answer(screen, CLICK, "first_result"), "first_result")
    goal = rng.choice((search_goal(app, term), search_and_open_goal(app, term)))
    if screen.kind == "keyboard":
        return sample(goal, f"操作：{TYPE}\n参数：{term}", None)
    key = "search_box" if screen.kind == "page" else "search_button"
    return sample(goal, _element_answer(screen, CLICK, key), key)


def _pick(rng: random.Random, categories: dict[str, tuple[float, list[Sample]]], used: set[str]) -> Sample | None:
    open_groups = {name: (weight, [s for s in samples if s.prompt not in used])
                   for name, (weight, samples) in categories.items()}
    open_groups = {name: group for name, group in open_groups.items() if group[1] and group[0] > 0}
    if not open_groups:
        return None
    name = _weighted_choice(rng, {name: weight for name, (weight, _) in open_groups.items()})
    return rng.choice(open_groups[name][1])


def screen_samples(screen: Screen, rng: random.Random) -> list[Sample]:
    """One to three samples; about 30% e2e, the rest actor and grounding at 45:25."""
    count = _weighted_choice(rng, SAMPLES_PER_SCREEN_WEIGHTS)
    samples: list[Sample] = []
    if rng.random() < E2E_PER_SCREEN:
        samples.append(_e2e_sample(screen, rng))
    used = {s.prompt for s in samples}
    while len(samples) < count:
        actor_first = rng.random() < ACTOR_SHARE_OF_REST
        sources = (_actor_categories, _grounding_categories) if actor_first else (_grounding_categories,
                                                                                  _actor_categories)
        picked = _pick(rng, sources[0](screen), used) or _pick(rng, sources[1](screen), used)
        if picked is None:
            break
        samples.append(picked)
        used.add(picked.prompt)
    return samples


def iter_split(seed: int, split: str, screens: int) -> Iterator[tuple[int, Screen, list[Sample]]]:
    for index in range(screens):
        screen, rng = render_screen(seed, split, index)
        yield index, screen, screen_samples(screen, rng)


# ---------------------------------------------------------------- files


def _sample_ids(split: str, index: int, samples: Sequence[Sample]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for sample in samples:
        seen[sample.family] = seen.get(sample.family, 0) + 1
        suffix = "" if seen[sample.family] == 1 else f"_{seen[sample.family]}"
        ids.append(f"{split}_{index:04d}_{sample.family}{suffix}")
    return ids


def _record(sample_id: str, image_path: str, size: tuple[int, int], sample: Sample) -> dict:
    return {
        "id": sample_id,
        "image": image_path,
        "width": size[0],
        "height": size[1],
        "conversations": [{"from": "human", "value": sample.prompt}, {"from": "gpt", "value": sample.answer}],
    }


def _clear_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("screen_*.png"):
        stale.unlink()


def _write_split(out_dir: Path, split: str, seed: int, screens: int) -> int:
    _clear_images(out_dir / "images" / split)
    lines = []
    for index, screen, samples in iter_split(seed, split, screens):
        image_path = f"images/{split}/screen_{index:04d}.png"
        screen.image.save(out_dir / image_path, format="PNG")
        for sample_id, sample in zip(_sample_ids(split, index, samples), samples):
            lines.append(json.dumps(_record(sample_id, image_path, screen.size, sample), ensure_ascii=False))
    annotation = out_dir / "annotations" / f"ui_dataset_{split}.jsonl"
    annotation.parent.mkdir(parents=True, exist_ok=True)
    annotation.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _write_meta(path: Path, meta_root: str, split: str, length: int) -> None:
    meta = {"ui-dataset": {"root": meta_root, "annotation": f"{meta_root}/annotations/ui_dataset_{split}.jsonl",
                           "data_augment": False, "repeat_time": 1, "length": length}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def generate_dataset(out_dir: Path, meta_root: str, *, seed: int, train_screens: int,
                     val_screens: int) -> dict[str, int]:
    """Writes the dataset; returns sample counts per split, e.g. {"train": 420, "val": 48}.

    `meta_root` is the dataset root as later stages see it (e.g. `data/ui-dataset`); the meta files
    point at `<meta_root>/annotations/ui_dataset_{train,val}.jsonl`.
    """
    if train_screens < 1 or val_screens < 1:
        raise ValueError(f"train_screens and val_screens must be at least 1, got {train_screens} and {val_screens}")
    out_dir = Path(out_dir)
    meta_root = meta_root.rstrip("/")
    counts = {split: _write_split(out_dir, split, seed, screens)
              for split, screens in (("train", train_screens), ("val", val_screens))}
    _write_meta(out_dir / "meta" / "ui_dataset.json", meta_root, "train", counts["train"])
    _write_meta(out_dir / "meta" / "ui_dataset_eval.json", meta_root, "val", counts["val"])
    return counts
