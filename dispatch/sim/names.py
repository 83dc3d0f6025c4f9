"""Chinese names for the demo town: places, people and department units.

Everything here is data plus small pure functions that draw from a caller's ``random.Random``,
so the generated town is the same for the same seed. The names are made up in the style of
towns in the Pearl River Delta (Cantonese surnames, 村/社区 place names); any likeness to a real
place is by genre, not by design.
"""

from __future__ import annotations

import random

TOWN_NAME = "永兴镇"

#: Level-2 names, most urban first: the generator gives the first ones to the grids nearest
#: the town centre, so the old town centre holds the 社区 (communities) and the outskirts the 村.
VILLAGE_NAMES: tuple[str, ...] = (
    "新联社区",
    "城南社区",
    "中心社区",
    "富华社区",
    "永兴村",
    "沙岗村",
    "龙湾村",
    "荷塘村",
    "石岗村",
    "大冲村",
    "莲塘村",
    "横岭村",
    "三洲村",
    "北圳村",
    "禾岗村",
    "塘尾村",
)

#: Cantonese-region surnames, roughly by frequency (陈, 李, 黄 and 梁 lead in Guangdong).
SURNAMES: tuple[str, ...] = (
    "陈", "李", "黄", "梁", "张", "林", "何", "刘", "吴", "罗", "郑", "谢", "冯", "麦",
    "邓", "区", "潘", "黎", "叶", "伍", "余", "苏", "关", "朱", "周", "杨", "卢", "彭",
    "钟", "曾", "胡", "莫", "欧阳", "袁", "简", "谭", "甘", "容",
)  # fmt: skip

_SURNAME_WEIGHTS: tuple[float, ...] = tuple(1.0 / (i + 3) for i in range(len(SURNAMES)))

#: Characters for given names (two-character given names are drawn from these).
GIVEN_CHARS: tuple[str, ...] = tuple(
    "伟强明华军辉杰健俊斌勇锋亮嘉志文振国家永海荣坚耀敏丽芳燕玲婷慧琳雯欣颖洁晓淑"
    "倩秀冰少惠宝锦泽浩宇子伦铭卓灿镇炳基达培兆颂满锐彩凤桂金银玉妙碧月雪春"
)

#: Department code → (Chinese name of the unit's organisation, name of one unit).
DEPARTMENTS: dict[str, tuple[str, str]] = {
    "police": ("派出所", "巡逻组"),
    "urban_management": ("综合行政执法队", "执法中队"),
    "fire": ("专职消防队", "消防车组"),
    "market_supervision": ("市场监督管理所", "检查组"),
    "environment": ("生态环境分局", "巡查组"),
}

#: Volunteer teams a volunteer can belong to (for the ``name`` column).
VOLUNTEER_TEAMS: tuple[str, ...] = ("联防队", "志愿服务队", "平安志愿者", "巾帼志愿队")


def person_name(rng: random.Random) -> str:
    """A plausible Chinese personal name: surname plus one or two given-name characters."""
    surname = rng.choices(SURNAMES, weights=_SURNAME_WEIGHTS)[0]
    n = 1 if rng.random() < 0.18 else 2
    return surname + "".join(rng.choice(GIVEN_CHARS) for _ in range(n))


def village_names(n: int) -> list[str]:
    """The first ``n`` level-2 names (most urban first)."""
    if n > len(VILLAGE_NAMES):
        raise ValueError(f"only {len(VILLAGE_NAMES)} village names, {n} asked")
    return list(VILLAGE_NAMES[:n])


def basic_grid_name(village: str, index: int) -> str:
    """Name of the ``index``-th (1-based) basic grid of a village, e.g. ``永兴村第1网格``."""
    return f"{village}第{index}网格"


def department_unit_name(department: str, index: int) -> str:
    """E.g. ``永兴镇派出所巡逻组03``."""
    org, unit = DEPARTMENTS[department]
    return f"{TOWN_NAME}{org}{unit}{index:02d}"


def volunteer_name(rng: random.Random, village: str) -> str:
    """E.g. ``陈家豪（永兴村联防队）``."""
    return f"{person_name(rng)}（{village}{rng.choice(VOLUNTEER_TEAMS)}）"
