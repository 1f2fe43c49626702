#!/usr/bin/env python3
"""Generate FineTune's bundled synthetic datasets, byte for byte reproducibly.

    python data/generate.py           # (re)write data/{sql,chat,instruct}/*.jsonl
    python data/generate.py --check   # regenerate into a temp dir; exit 1 if a committed file differs

Everything here is written by this project: the table schemas, value pools, question phrasings,
glossary and templates are invented in this file, and every row is produced by seeded
`random.Random` instances (never the global RNG). Standard library only. Nothing iterates over a
set or depends on hash order, so the output does not change with PYTHONHASHSEED.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SEED = 20240613
HERE = Path(__file__).resolve().parent

SQL_SPLITS = (("train", 3000), ("valid", 300), ("test", 300))
CHAT_SPLITS = (("train", 400), ("valid", 40))
INSTRUCT_SPLITS = (("train", 800), ("valid", 80))


# ---------------------------------------------------------------------------------------------
# Shared word lists (invented or common English words; no external source)
# ---------------------------------------------------------------------------------------------

# fmt: off
FIRST_NAMES = [
    "Alice", "Ben", "Carla", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko",
    "Liam", "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera",
    "Walter", "Ximena", "Yusuf", "Zoe", "Arjun", "Bianca", "Connor", "Dara", "Emil", "Fiona",
    "Gustavo", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nadia",
]
LAST_NAMES = [
    "Abbott", "Brennan", "Castillo", "Dawson", "Eriksen", "Fischer", "Garner", "Holloway", "Ibarra",
    "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quintero",
    "Rahman", "Santos", "Thornton", "Ueda", "Varga", "Whitfield", "Yilmaz", "Zeller", "Alvarez",
    "Bishop", "Chen", "Duarte", "Ellison", "Fontaine", "Gallagher", "Hartmann", "Ivanova", "Kaplan",
    "Lambert", "Mendez", "Novak", "Osei", "Park",
]
PLACE_HEADS = [
    "Al", "Bel", "Cor", "Dun", "El", "Fal", "Gar", "Hal", "Kes", "Lor", "Mar", "Nor", "Or", "Pen",
    "Quin", "Ros", "Sal", "Tor", "Val", "Wes", "Ash", "Brim", "Cal", "Dor", "Fen",
]
PLACE_TAILS = [
    "ford", "mont", "dale", "ton", "bury", "ville", "haven", "more", "field", "ridge", "port",
    "wick", "stead", "vale", "brook", "wood", "gate", "mouth", "holm", "crest",
]
COUNTRIES = [
    "Norway", "Kenya", "Peru", "Japan", "Canada", "Brazil", "Portugal", "Ghana", "Chile", "Finland",
    "Vietnam", "Morocco", "Ireland", "Mexico", "Poland", "Egypt", "Austria", "Colombia", "India",
    "Sweden", "Argentina", "Nigeria", "Greece", "Australia", "Spain",
]
TITLE_ADJ = [
    "Silver", "Quiet", "Midnight", "Golden", "Broken", "Distant", "Electric", "Hidden", "Lonely",
    "Northern", "Scarlet", "Wild", "Frozen", "Endless", "Paper", "Burning", "Hollow", "Crystal",
    "Velvet", "Restless", "Secret", "Iron", "Summer", "Falling",
]
TITLE_NOUN = [
    "Harbor", "River", "Engine", "Garden", "Horizon", "Mirror", "Lantern", "Kingdom", "Signal",
    "Orchard", "Compass", "Tide", "Machine", "Letter", "Canyon", "Parade", "Shadow", "Voyage",
    "Skyline", "Meadow", "Echo", "Circuit", "Island", "Storm",
]
MASCOTS = [
    "Hawks", "Rangers", "Comets", "Wolves", "Pioneers", "Falcons", "Tigers", "Mariners", "Bears",
    "Knights", "Rockets", "Foxes", "Owls", "Titans", "Stallions", "Herons",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
# fmt: on
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def place(rng: random.Random) -> str:
    return rng.choice(PLACE_HEADS) + rng.choice(PLACE_TAILS)


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def title(rng: random.Random) -> str:
    pattern = rng.randrange(4)
    adj, noun = rng.choice(TITLE_ADJ), rng.choice(TITLE_NOUN)
    if pattern == 0:
        return f"The {adj} {noun}"
    if pattern == 1:
        return f"{adj} {noun}"
    if pattern == 2:
        return f"{noun} of {place(rng)}"
    return f"{adj} {noun}s"


# ---------------------------------------------------------------------------------------------
# SQL: invented single-table schemas, WikiSQL-style questions, completions-format rows
# ---------------------------------------------------------------------------------------------

# Value kinds. Text kinds are generator names or literal choice lists; numeric kinds are tuples:
#   ("int", lo, hi)         aggregatable integer     ("real", lo, hi, decimals)  aggregatable
#   ("year", lo, hi)        MIN/MAX/compare only      ("code", lo, hi)  numeric identifier, '=' only
TEXT_KINDS = {
    "person": person,
    "place": place,
    "country": lambda r: r.choice(COUNTRIES),
    "title": title,
    "team": lambda r: f"{place(r)} {r.choice(MASCOTS)}",
    "date": lambda r: f"{r.choice(MONTHS)} {r.randint(1, 28)}",
    "score": lambda r: f"{r.randint(0, 5)}-{r.randint(0, 5)}",
    "river": lambda r: f"{place(r)} River",
    "peak": lambda r: r.choice(["Mount ", ""]) + place(r) + r.choice(["", " Peak"]),
    "island": lambda r: f"{place(r)} Island",
    "sea": lambda r: r.choice(["Gulf of ", "Bay of "]) + place(r),
    "band": lambda r: r.choice(["The ", ""]) + f"{r.choice(TITLE_ADJ)} {r.choice(TITLE_NOUN)}s",
    "school": lambda r: f"{place(r)} " + r.choice(["High School", "Academy", "Secondary School"]),
    "university": lambda r: (
        r.choice(["University of ", ""]) + place(r) + r.choice(["", " University", " College"])
    ),
    "company": lambda r: f"{place(r)} " + r.choice(["Industries", "Works", "Labs", "Group"]),
    "product": lambda r: (
        f"{r.choice(TITLE_ADJ)} "
        + r.choice(["Blender", "Kettle", "Lamp", "Backpack", "Speaker", "Desk", "Jacket", "Mixer"])
        + f" {r.randint(1, 9)}00"
    ),
    "phone": lambda r: (
        r.choice(["Nova", "Pulse", "Orbit", "Zen", "Aero"])
        + f" {r.randint(3, 15)}"
        + r.choice(["", " Pro", " Lite", " Max"])
    ),
    "car": lambda r: (
        r.choice(["Aster", "Brio", "Corsa", "Delta", "Ember", "Fjord", "Granite"])
        + r.choice(["", " GT", " Sport", " Hybrid", " LX"])
    ),
    "restaurant": lambda r: (
        r.choice(["The ", "Cafe ", ""])
        + f"{r.choice(TITLE_ADJ)} "
        + r.choice(["Spoon", "Table", "Olive", "Kitchen", "Lantern", "Fig"])
    ),
    "airport": lambda r: f"{place(r)} " + r.choice(["International", "Regional", "Airport"]),
    "iata": lambda r: "".join(r.choice("ABCDEFGHJKLMNPRSTVWXZ") for _ in range(3)),
    "flight": lambda r: (
        "".join(r.choice("ABCDEFGHJKLMNPRSTVWXZ") for _ in range(2)) + f" {r.randint(100, 999)}"
    ),
    "time": lambda r: f"{r.randint(5, 22):02d}:{r.choice([0, 10, 15, 20, 30, 40, 45, 50]):02d}",
    "ship": lambda r: (
        r.choice(["MV ", "SS ", "RV "])
        + f"{r.choice(TITLE_ADJ)} "
        + r.choice(["Star", "Wave", "Gull", "Spirit", "Dawn", "Pearl", "Crown"])
    ),
    "station": lambda r: f"{place(r)} " + r.choice(["Central", "Street", "Junction", "Park", ""]),
    "hospital": lambda r: (
        f"{place(r)} "
        + r.choice(["General Hospital", "Medical Center", "Clinic", "Children's Hospital"])
    ),
    "museum": lambda r: (
        f"{place(r)} " + r.choice(["Museum of Art", "History Museum", "Science Museum", "Gallery"])
    ),
    "bridge": lambda r: f"{place(r)} Bridge",
    "orchestra": lambda r: (
        f"{place(r)} " + r.choice(["Symphony Orchestra", "Philharmonic", "Chamber Orchestra"])
    ),
    "district": lambda r: f"{place(r)} {r.randint(1, 12)}",
    "course": lambda r: (
        r.choice(["CS", "MATH", "BIO", "HIST", "CHEM", "ECON"])
        + f" {r.randint(1, 4)}{r.randint(0, 9)}{r.randint(1, 9)}"
    ),
    "tournament": lambda r: f"{place(r)} " + r.choice(["Open", "Classic", "Masters", "Cup"]),
    "route": lambda r: f"{place(r)} to {place(r)}",
    "race_time": lambda r: f"2:{r.randint(3, 15):02d}:{r.randint(0, 59):02d}",
}

POSITIONS = ["Guard", "Forward", "Center", "Point Guard", "Shooting Guard", "Power Forward"]
GENRES = ["Drama", "Comedy", "Thriller", "Documentary", "Animation", "Science Fiction", "Horror"]
MUSIC_GENRES = ["Rock", "Pop", "Jazz", "Folk", "Electronic", "Hip hop", "Country", "Soul"]
PARTIES = ["Democratic", "Republican", "Independent", "Green", "Libertarian"]
MOUNTAIN_RANGES = ["Eastern Range", "Coastal Range", "High Ridge", "Granite Hills", "Northern Alps"]
AWARD_CATEGORIES = [
    "Best Picture",
    "Best Director",
    "Best Actress",
    "Best Actor",
    "Best Screenplay",
    "Best Score",
]
ASSEMBLY_PARTIES = [
    "Unity Party",
    "Farmers League",
    "Civic Alliance",
    "Green Union",
    "Labour Front",
    "Liberal Forum",
]
REFERENDUM_TOPICS = [
    "Independence",
    "Electoral reform",
    "Treaty ratification",
    "Voting age",
    "Daylight saving",
    "Constitution",
]
DEPARTMENTS = ["Computer Science", "Mathematics", "Biology", "History", "Chemistry", "Economics"]

# (table, [(column, kind), ...]); 4-7 columns each, spread across domains.
# fmt: off
SCHEMAS: list[tuple[str, list[tuple[str, object]]]] = [
    ("basketball_players", [
        ("player", "person"), ("team", "team"), ("position", POSITIONS),
        ("jersey_number", ("code", 0, 99)), ("season", ("year", 1995, 2023)),
        ("points", ("int", 120, 2400)),
    ]),
    ("football_matches", [
        ("home_team", "team"), ("away_team", "team"), ("venue", "place"),
        ("attendance", ("int", 4000, 82000)), ("round", ("int", 1, 38)), ("date", "date"),
    ]),
    ("tennis_finals", [
        ("tournament", "tournament"), ("surface", ["Hard", "Clay", "Grass", "Carpet"]),
        ("opponent", "person"), ("year", ("year", 1988, 2023)), ("score", "score"),
        ("outcome", ["Winner", "Runner-up"]),
    ]),
    ("medal_table", [
        ("nation", "country"), ("gold", ("int", 0, 40)), ("silver", ("int", 0, 40)),
        ("bronze", ("int", 0, 40)), ("total", ("int", 1, 110)), ("rank", ("int", 1, 60)),
    ]),
    ("cycling_stages", [
        ("stage", ("int", 1, 21)), ("route", "route"), ("distance_km", ("real", 8, 240, 1)),
        ("stage_winner", "person"), ("team", "team"),
    ]),
    ("golf_tournaments", [
        ("tournament", "tournament"), ("location", "place"), ("winner", "person"),
        ("score", ("int", 258, 292)), ("purse_usd", ("int", 500000, 9000000)),
        ("year", ("year", 1975, 2023)),
    ]),
    ("marathons", [
        ("city", "place"), ("year", ("year", 1980, 2023)), ("winner", "person"),
        ("country", "country"), ("time", "race_time"), ("finishers", ("int", 800, 52000)),
    ]),
    ("chess_players", [
        ("player", "person"), ("federation", "country"), ("rating", ("int", 2200, 2850)),
        ("title", ["GM", "IM", "FM", "CM"]), ("birth_year", ("year", 1950, 2008)),
    ]),
    ("albums", [
        ("album", "title"), ("artist", "band"), ("release_year", ("year", 1965, 2023)),
        ("label", ["Harbor Records", "Blue Fern", "Northlight", "Gravel Music", "Sundial"]),
        ("peak_position", ("int", 1, 100)),
        ("certification", ["Gold", "Platinum", "Silver", "Diamond"]),
    ]),
    ("chart_singles", [
        ("song", "title"), ("artist", "band"), ("weeks_on_chart", ("int", 1, 60)),
        ("peak", ("int", 1, 100)), ("year", ("year", 1970, 2023)), ("genre", MUSIC_GENRES),
    ]),
    ("concert_tours", [
        ("tour", "title"), ("artist", "band"), ("shows", ("int", 8, 180)),
        ("gross_usd", ("int", 1000000, 250000000)), ("start_year", ("year", 1985, 2023)),
    ]),
    ("orchestras", [
        ("orchestra", "orchestra"), ("conductor", "person"), ("founded", ("year", 1820, 2010)),
        ("musicians", ("int", 30, 130)), ("home_hall", "place"),
    ]),
    ("countries", [
        ("country", "country"), ("capital", "place"),
        ("continent", ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]),
        ("population_millions", ("real", 0.5, 300, 1)), ("area_km2", ("int", 20000, 3000000)),
        ("currency", ["Krone", "Shilling", "Sol", "Yen", "Dollar", "Peso", "Euro", "Rupee"]),
    ]),
    ("rivers", [
        ("river", "river"), ("country", "country"), ("length_km", ("int", 40, 4200)),
        ("outflow", "sea"), ("basin_area_km2", ("int", 500, 900000)),
    ]),
    ("mountains", [
        ("peak", "peak"),
        ("mountain_range", MOUNTAIN_RANGES),
        ("country", "country"), ("elevation_m", ("int", 900, 8400)),
        ("prominence_m", ("int", 100, 4500)), ("first_ascent", ("year", 1786, 1990)),
    ]),
    ("cities", [
        ("city", "place"), ("country", "country"), ("population", ("int", 20000, 9000000)),
        ("elevation_m", ("int", 0, 2600)), ("founded", ("year", 1100, 1950)), ("mayor", "person"),
    ]),
    ("islands", [
        ("island", "island"), ("ocean", ["Atlantic", "Pacific", "Indian", "Arctic"]),
        ("area_km2", ("real", 1, 9000, 1)), ("population", ("int", 0, 400000)),
        ("country", "country"),
    ]),
    ("weather_stations", [
        ("station", "station"), ("region", "place"), ("avg_temp_c", ("real", -12, 29, 1)),
        ("rainfall_mm", ("int", 80, 3200)), ("elevation_m", ("int", 0, 3500)),
    ]),
    ("films", [
        ("film", "title"), ("director", "person"), ("year", ("year", 1950, 2023)),
        ("genre", GENRES), ("runtime_min", ("int", 72, 205)),
        ("box_office_millions", ("real", 0.2, 900, 1)),
    ]),
    ("film_awards", [
        ("ceremony", ("int", 1, 95)),
        ("category", AWARD_CATEGORIES),
        ("nominee", "person"), ("film", "title"), ("result", ["Won", "Nominated"]),
        ("year", ("year", 1960, 2023)),
    ]),
    ("tv_episodes", [
        ("episode_title", "title"), ("season", ("int", 1, 12)), ("episode", ("int", 1, 24)),
        ("director", "person"), ("writer", "person"), ("viewers_millions", ("real", 0.4, 25, 2)),
        ("air_date", "date"),
    ]),
    ("actors", [
        ("actor", "person"), ("birthplace", "place"), ("films", ("int", 1, 120)),
        ("debut_year", ("year", 1955, 2020)), ("awards", ("int", 0, 30)),
    ]),
    ("house_elections", [
        ("district", "district"), ("incumbent", "person"), ("party", PARTIES),
        ("first_elected", ("year", 1960, 2020)),
        ("result", ["Re-elected", "Retired", "Lost re-election", "Lost primary"]),
        ("votes", ("int", 20000, 310000)),
    ]),
    ("election_results", [
        ("candidate", "person"), ("party", PARTIES), ("votes", ("int", 300, 250000)),
        ("percentage", ("real", 0.5, 78, 1)), ("constituency", "place"),
        ("year", ("year", 1990, 2023)),
    ]),
    ("parliament_seats", [
        ("party", ASSEMBLY_PARTIES),
        ("seats", ("int", 0, 220)), ("seat_change", ("int", -40, 40)),
        ("vote_share", ("real", 0.5, 45, 1)), ("leader", "person"),
        ("election_year", ("year", 1990, 2023)),
    ]),
    ("referendums", [
        ("question", REFERENDUM_TOPICS),
        ("country", "country"), ("year", ("year", 1970, 2023)), ("turnout", ("real", 22, 95, 1)),
        ("yes_percent", ("real", 12, 90, 1)), ("outcome", ["Passed", "Rejected"]),
    ]),
    ("schools", [
        ("school", "school"), ("city", "place"), ("enrollment", ("int", 150, 3800)),
        ("founded", ("year", 1850, 2015)), ("mascot", MASCOTS),
        ("school_type", ["Public", "Private", "Charter"]),
    ]),
    ("universities", [
        ("university", "university"), ("country", "country"), ("founded", ("year", 1200, 2000)),
        ("students", ("int", 1500, 80000)), ("control", ["Public", "Private"]),
        ("endowment_millions", ("int", 10, 40000)),
    ]),
    ("school_teams", [
        ("school", "school"),
        ("sport", ["Soccer", "Basketball", "Swimming", "Volleyball", "Track", "Baseball"]),
        ("coach", "person"), ("wins", ("int", 0, 30)), ("losses", ("int", 0, 30)),
        ("conference", ["North", "South", "East", "West", "Central"]),
    ]),
    ("courses", [
        ("course_code", "course"), ("course_title", "title"),
        ("department", DEPARTMENTS),
        ("credits", ("int", 1, 6)), ("instructor", "person"), ("capacity", ("int", 12, 300)),
    ]),
    ("products", [
        ("product", "product"),
        ("category", ["Kitchen", "Outdoor", "Office", "Audio", "Clothing", "Lighting"]),
        ("price", ("real", 3, 900, 2)), ("stock", ("int", 0, 2500)), ("supplier", "company"),
        ("rating", ("real", 1, 5, 1)),
    ]),
    ("smartphones", [
        ("model", "phone"), ("manufacturer", "company"), ("release_year", ("year", 2008, 2024)),
        ("screen_inches", ("real", 4, 7.2, 1)), ("battery_mah", ("int", 1500, 6000)),
        ("price_usd", ("int", 99, 1600)),
    ]),
    ("cars", [
        ("model", "car"), ("maker", "company"), ("year", ("year", 1990, 2024)),
        ("horsepower", ("int", 70, 650)), ("fuel", ["Petrol", "Diesel", "Electric", "Hybrid"]),
        ("price_usd", ("int", 9000, 180000)),
    ]),
    ("books", [
        ("book", "title"), ("author", "person"), ("publisher", "company"),
        ("year", ("year", 1900, 2024)), ("pages", ("int", 90, 1200)),
        ("genre", ["Mystery", "Fantasy", "Biography", "Poetry", "Romance", "History"]),
    ]),
    ("video_games", [
        ("game", "title"), ("developer", "company"),
        ("platform", ["PC", "Console", "Handheld", "Mobile"]),
        ("release_year", ("year", 1985, 2024)),
        ("genre", ["Puzzle", "Racing", "Strategy", "Platformer", "Role-playing", "Sports"]),
        ("units_sold_millions", ("real", 0.1, 40, 1)),
    ]),
    ("restaurants", [
        ("restaurant", "restaurant"), ("city", "place"),
        ("cuisine", ["Italian", "Thai", "Mexican", "Ethiopian", "Korean", "Lebanese", "French"]),
        ("rating", ("real", 2, 5, 1)), ("seats", ("int", 12, 240)), ("owner", "person"),
    ]),
    ("airports", [
        ("airport", "airport"), ("city", "place"), ("country", "country"), ("iata_code", "iata"),
        ("passengers", ("int", 50000, 80000000)), ("runways", ("int", 1, 6)),
    ]),
    ("flights", [
        ("flight", "flight"), ("origin", "place"), ("destination", "place"), ("departure", "time"),
        ("duration_min", ("int", 35, 840)), ("aircraft", ["A320", "B737", "A350", "B787", "E190"]),
    ]),
    ("ships", [
        ("ship", "ship"), ("ship_type", ["Ferry", "Cargo", "Research", "Tanker", "Cruise"]),
        ("launched", ("year", 1900, 2022)), ("tonnage", ("int", 300, 120000)),
        ("builder", "company"), ("fate", ["In service", "Scrapped", "Sunk", "Museum ship"]),
    ]),
    ("railway_stations", [
        ("station", "station"), ("line", ["Red", "Blue", "Green", "Orange", "Purple"]),
        ("opened", ("year", 1840, 2020)), ("platforms", ("int", 1, 16)),
        ("daily_passengers", ("int", 200, 400000)), ("zone", ("code", 1, 9)),
    ]),
    ("hospitals", [
        ("hospital", "hospital"), ("city", "place"), ("beds", ("int", 20, 1800)),
        ("founded", ("year", 1750, 2015)),
        ("hospital_type", ["Teaching", "Community", "Specialist", "Private"]),
    ]),
    ("museums", [
        ("museum", "museum"), ("city", "place"), ("visitors", ("int", 5000, 9000000)),
        ("established", ("year", 1750, 2020)), ("director", "person"),
    ]),
    ("bridges", [
        ("bridge", "bridge"), ("river", "river"), ("city", "place"),
        ("length_m", ("int", 40, 6500)), ("opened", ("year", 1800, 2023)),
        ("design", ["Suspension", "Arch", "Beam", "Cable-stayed", "Truss"]),
    ]),
]
# fmt: on

# Column names that read better with a little more than underscores-to-spaces.
DISPLAY = {
    "distance_km": "distance (km)",
    "purse_usd": "purse ($)",
    "gross_usd": "gross ($)",
    "population_millions": "population (millions)",
    "area_km2": "area (km²)",
    "basin_area_km2": "basin area (km²)",
    "length_km": "length (km)",
    "elevation_m": "elevation (m)",
    "prominence_m": "prominence (m)",
    "avg_temp_c": "average temperature (°C)",
    "rainfall_mm": "rainfall (mm)",
    "box_office_millions": "box office (millions)",
    "runtime_min": "runtime (minutes)",
    "viewers_millions": "viewers (millions)",
    "endowment_millions": "endowment (millions)",
    "screen_inches": "screen size (inches)",
    "battery_mah": "battery (mAh)",
    "price_usd": "price ($)",
    "units_sold_millions": "units sold (millions)",
    "duration_min": "duration (minutes)",
    "length_m": "length (m)",
    "yes_percent": "yes vote (%)",
    "percentage": "vote percentage",
    "iata_code": "IATA code",
}

SELECT_TEMPLATES = [
    ("What is the {sel} when {conds}?", "is"),
    ("What was the {sel} when {conds}?", "is"),
    ("Which {sel} has {conds}?", "of"),
    ("What {sel} has {conds}?", "of"),
    ("Name the {sel} for {conds}", "bare"),
    ("Tell me the {sel} with {conds}.", "of"),
    ("Give the {sel} where {conds}.", "is"),
]
AGG_TEMPLATES = {
    "COUNT": [
        ("How many {sel} entries are there when {conds}?", "is"),
        ("What is the total number of {sel} when {conds}?", "is"),
        ("Count the {sel} for {conds}.", "bare"),
        ("How many {sel} values have {conds}?", "of"),
    ],
    "MAX": [
        ("What is the highest {sel} when {conds}?", "is"),
        ("Name the most {sel} for {conds}", "bare"),
        ("What is the largest {sel} with {conds}?", "of"),
        ("What is the maximum {sel} when {conds}?", "is"),
    ],
    "MIN": [
        ("What is the lowest {sel} when {conds}?", "is"),
        ("Name the least {sel} for {conds}", "bare"),
        ("What is the smallest {sel} with {conds}?", "of"),
        ("What is the minimum {sel} when {conds}?", "is"),
    ],
    "AVG": [
        ("What is the average {sel} when {conds}?", "is"),
        ("What is the mean {sel} for {conds}?", "bare"),
        ("Tell me the average {sel} with {conds}.", "of"),
    ],
    "SUM": [
        ("What is the total {sel} when {conds}?", "is"),
        ("What is the sum of {sel} for {conds}?", "bare"),
        ("Add up the {sel} with {conds}.", "of"),
    ],
}
GREATER = ["greater than", "more than", "larger than", "over", "above"]
LESS = ["less than", "smaller than", "under", "below"]


class Column:
    def __init__(self, name: str, kind: object, rng: random.Random) -> None:
        self.name = name
        self.display = DISPLAY.get(name, name.replace("_", " "))
        if isinstance(kind, tuple):
            self.type = kind[0]
            self.pool = self._numbers(kind, rng)
        else:
            self.type = "text"
            self.pool = self._texts(kind, rng)

    @staticmethod
    def _numbers(kind: tuple, rng: random.Random) -> list[str]:
        out: list[str] = []
        for _ in range(14):
            if kind[0] == "real":
                lo, hi, dec = kind[1], kind[2], kind[3]
                value = f"{rng.uniform(lo, hi):.{dec}f}"
            else:
                value = str(rng.randint(kind[1], kind[2]))
            if value not in out:
                out.append(value)
        return out

    @staticmethod
    def _texts(kind: object, rng: random.Random) -> list[str]:
        if isinstance(kind, list):
            return list(kind)
        make = TEXT_KINDS[kind]
        out: list[str] = []
        for _ in range(40):
            value = make(rng)
            if value not in out:
                out.append(value)
            if len(out) == 12:
                break
        return out

    @property
    def numeric(self) -> bool:
        return self.type != "text"

    @property
    def comparable(self) -> bool:
        return self.type in ("int", "real", "year")

    def literal(self, value: str) -> str:
        return value if self.numeric else "'" + value.replace("'", "''") + "'"


def build_tables(rng: random.Random) -> list[tuple[str, list[Column]]]:
    return [(name, [Column(c, k, rng) for c, k in cols]) for name, cols in SCHEMAS]


def condition(rng: random.Random, col: Column, allow_compare: bool) -> tuple[str, str, str]:
    op = "="
    if allow_compare and col.comparable and rng.random() < 0.45:
        op = rng.choice([">", "<"])
    return col.name, op, rng.choice(col.pool)


def render_condition(rng: random.Random, col: Column, op: str, value: str, style: str) -> str:
    d = col.display
    if op == "=":
        return {"is": f"{d} is {value}", "of": f"a {d} of {value}", "bare": f"{d} {value}"}[style]
    word = rng.choice(GREATER if op == ">" else LESS)
    return {
        "is": f"{d} is {word} {value}",
        "of": f"a {d} {word} {value}",
        "bare": f"{d} {word} {value}",
    }[style]


def sql_row(rng: random.Random, tables: list[tuple[str, list[Column]]]) -> dict[str, str]:
    table, cols = rng.choice(tables)
    shape = rng.choices(
        ["SELECT", "COUNT", "MAX", "MIN", "AVG", "SUM"], weights=[45, 15, 10, 10, 10, 10]
    )[0]
    if shape in ("AVG", "SUM"):
        candidates = [c for c in cols if c.type in ("int", "real")]
    elif shape in ("MAX", "MIN"):
        candidates = [c for c in cols if c.comparable]
    else:
        candidates = list(cols)
    if not candidates:
        candidates, shape = list(cols), "SELECT"
    sel = rng.choice(candidates)
    others = [c for c in cols if c is not sel]
    n_conds = 2 if rng.random() < 0.3 and len(others) >= 2 else 1
    where_cols = rng.sample(others, n_conds)
    conds = [condition(rng, c, allow_compare=True) for c in where_cols]

    template, style = rng.choice(SELECT_TEMPLATES if shape == "SELECT" else AGG_TEMPLATES[shape])
    phrases = [
        render_condition(rng, c, op, v, style)
        for c, (_, op, v) in zip(where_cols, conds, strict=True)
    ]
    question = template.format(sel=sel.display, conds=" and ".join(phrases))
    question = question[0].upper() + question[1:]

    target = sel.name if shape == "SELECT" else f"{shape}({sel.name})"
    where = " AND ".join(
        f"{name} {op} {c.literal(v)}" for c, (name, op, v) in zip(where_cols, conds, strict=True)
    )
    prompt = f"table: {table}\ncolumns: {', '.join(c.name for c in cols)}\nQ: {question}\nA: "
    return {"prompt": prompt, "completion": f"SELECT {target} FROM {table} WHERE {where}"}


def make_sql(rng: random.Random) -> dict[str, list[dict]]:
    tables = build_tables(rng)
    total = sum(n for _, n in SQL_SPLITS)
    rows, _ = unique_rows(rng, lambda: sql_row(rng, tables), total, key=lambda r: r["prompt"])
    return split(rows, SQL_SPLITS)


# ---------------------------------------------------------------------------------------------
# Chat: unit conversions, dates, arithmetic word problems, spelling, a small glossary
# ---------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and accurately.",
    "You are a friendly tutor. Show the working for any calculation.",
    "You are a helpful assistant for questions about units, dates, numbers and words.",
    "Answer the user's questions clearly and correctly.",
]

# (singular, plural, target singular, target plural, factor, exact?)
CONVERSIONS = [
    ("kilometer", "kilometers", "mile", "miles", Decimal("0.621371"), False),
    ("mile", "miles", "kilometer", "kilometers", Decimal("1.609344"), True),
    ("kilogram", "kilograms", "pound", "pounds", Decimal("2.20462"), False),
    ("pound", "pounds", "kilogram", "kilograms", Decimal("0.45359237"), True),
    ("inch", "inches", "centimeter", "centimeters", Decimal("2.54"), True),
    ("foot", "feet", "meter", "meters", Decimal("0.3048"), True),
    ("meter", "meters", "foot", "feet", Decimal("3.28084"), False),
    ("liter", "liters", "US gallon", "US gallons", Decimal("0.264172"), False),
    ("US gallon", "US gallons", "liter", "liters", Decimal("3.785411784"), True),
    ("hour", "hours", "minute", "minutes", Decimal("60"), True),
    ("day", "days", "hour", "hours", Decimal("24"), True),
    ("minute", "minutes", "second", "seconds", Decimal("60"), True),
    ("kilometer", "kilometers", "meter", "meters", Decimal("1000"), True),
    ("ounce", "ounces", "gram", "grams", Decimal("28.349523125"), True),
]

GLOSSARY = [
    ("algorithm", "a precise, step-by-step procedure for solving a problem or carrying out a task"),
    ("variable", "a named place in a program that holds a value which can change while it runs"),
    (
        "photosynthesis",
        "the process by which plants use light, water and carbon dioxide to make "
        "sugar and release oxygen",
    ),
    ("prime number", "a whole number greater than 1 whose only divisors are 1 and itself"),
    ("noun", "a word that names a person, place, thing or idea"),
    ("verb", "a word that describes an action, an event or a state"),
    ("adjective", "a word that describes or modifies a noun"),
    ("synonym", "a word that means the same, or nearly the same, as another word"),
    ("antonym", "a word with the opposite meaning of another word"),
    ("perimeter", "the total length of the boundary around a flat shape"),
    ("area", "the amount of flat surface a shape covers, measured in square units"),
    ("fraction", "a number that represents part of a whole, written as one number over another"),
    ("percentage", "a number expressed as a part of one hundred"),
    (
        "evaporation",
        "the change of a liquid into a gas, usually at its surface and below boiling point",
    ),
    (
        "condensation",
        "the change of a gas or vapour into a liquid, for example dew forming on grass",
    ),
    ("orbit", "the curved path one object takes around another because of gravity"),
    ("ecosystem", "a community of living things together with the environment they share"),
    ("budget", "a plan that sets out expected income and spending over a period of time"),
    ("interest", "money paid for the use of borrowed money, usually a percentage of the amount"),
    ("inflation", "a general rise in prices over time, which lowers what a unit of money can buy"),
    ("compiler", "a program that translates source code into a form a computer can run"),
    ("database", "an organised collection of data that can be searched and updated"),
    ("spreadsheet", "a grid of rows and columns used to store, calculate and compare data"),
    ("bandwidth", "the amount of data a connection can carry in a given amount of time"),
    ("metaphor", "a figure of speech that describes something as if it were something else"),
    ("paragraph", "a group of sentences about one main idea, usually starting on a new line"),
    ("hypothesis", "a testable explanation proposed before an experiment is carried out"),
    ("median", "the middle value of a sorted list of numbers"),
    ("average", "the sum of a list of numbers divided by how many numbers there are"),
    ("leap year", "a year with 366 days, where February has 29 days instead of 28"),
    ("latitude", "the distance of a place north or south of the equator, measured in degrees"),
    (
        "longitude",
        "the distance of a place east or west of the prime meridian, measured in degrees",
    ),
    ("palindrome", "a word or phrase that reads the same forwards and backwards"),
    ("recipe", "a set of instructions for preparing a particular dish, with a list of ingredients"),
    ("thermometer", "an instrument used to measure temperature"),
    ("volcano", "an opening in the Earth's crust through which molten rock, ash and gas escape"),
]

# Glossary terms used without an article ("What is photosynthesis?").
# fmt: off
MASS_TERMS = [
    "photosynthesis", "evaporation", "condensation", "inflation", "interest", "area", "bandwidth",
    "latitude", "longitude",
]
# fmt: on

# fmt: off
WORDS = [
    "apple", "garden", "window", "river", "planet", "yellow", "pencil", "bridge", "kitchen",
    "mountain", "library", "orange", "picture", "rabbit", "summer", "table", "thunder", "village",
    "whistle", "blanket", "candle", "dolphin", "feather", "harbor", "island", "jacket", "lantern",
    "marble", "notebook", "ocean", "pepper", "question", "rainbow", "saddle", "ticket", "umbrella",
    "velvet", "wonder", "balloon", "cabinet", "elephant", "forest", "giraffe", "hammer", "journey",
    "kettle", "lemon", "meadow", "needle", "octopus", "puzzle", "rocket", "silver", "tomato",
    "valley", "wagon", "zebra", "banana", "cookie", "dragon", "engine", "level", "radar", "kayak",
    "letter", "coffee", "butter", "school", "bottle", "mirror",
]
# fmt: on

# (name, subject pronoun)
# fmt: off
PEOPLE = [
    ("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Leo", "he"), ("Priya", "she"),
    ("Jonas", "he"), ("Mei", "she"), ("Omar", "he"), ("Sofia", "she"), ("Kwame", "he"),
    ("Elin", "she"), ("Diego", "he"),
]
ITEMS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards",
    "oranges", "balloons", "coins",
]
# fmt: on


def fmt_dec(value: Decimal) -> str:
    """Round to 2 places (half up) and drop trailing zeros: 7.50 -> 7.5, 12.00 -> 12."""
    q = value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    text = f"{q:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def fmt_date(d: dt.date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(1950, 1, 1).toordinal()
    return dt.date.fromordinal(start + rng.randrange(365 * 90))


def convert_answer(conv: tuple, value: int) -> str:
    sing, plur, tsing, tplur, factor, exact = conv
    result = Decimal(value) * factor
    shown = fmt_dec(result)
    unit = sing if value == 1 else plur
    tunit = tsing if shown == "1" else tplur
    word = "is" if result == result.quantize(Decimal("0.01")) else "is about"
    rule = "is exactly" if exact else "is about"
    return (
        f"{value} {unit} {word} {shown} {tunit}, because 1 {sing} {rule} "
        f"{format(factor.normalize(), 'f')} {tplur}."
    )


def chat_conversion(rng: random.Random):
    conv = rng.choice(CONVERSIONS)
    value = rng.randint(1, 250)
    unit = conv[0] if value == 1 else conv[1]
    q = rng.choice(
        [
            f"How many {conv[3]} are in {value} {unit}?",
            f"Convert {value} {unit} to {conv[3]}.",
            f"What is {value} {unit} in {conv[3]}?",
            f"Can you tell me how many {conv[3]} {value} {unit} is?",
        ]
    )

    def follow(r: random.Random):
        v2 = r.randint(1, 250)
        while v2 == value:
            v2 = r.randint(1, 250)
        return (
            r.choice([f"And {v2}?", f"What about {v2} {conv[0] if v2 == 1 else conv[1]}?"]),
            convert_answer(conv, v2),
        )

    return q, convert_answer(conv, value), follow


def chat_temperature(rng: random.Random):
    if rng.random() < 0.5:
        c = rng.randint(-30, 45)
        f = Decimal(c) * 9 / 5 + 32
        q = rng.choice(
            [f"What is {c} °C in Fahrenheit?", f"Convert {c} degrees Celsius to Fahrenheit."]
        )
        a = f"{c} °C is {fmt_dec(f)} °F. Multiply by 9/5 and add 32: {c} × 9/5 + 32 = {fmt_dec(f)}."
    else:
        f = rng.randint(-20, 110)
        c = (Decimal(f) - 32) * 5 / 9
        q = rng.choice(
            [f"What is {f} °F in Celsius?", f"Convert {f} degrees Fahrenheit to Celsius."]
        )
        shown = fmt_dec(c)
        approx = "" if c == c.quantize(Decimal("0.01")) else "about "
        a = f"{f} °F is {approx}{shown} °C. Subtract 32 and multiply by 5/9: ({f} − 32) × 5/9 ≈ {shown}."
        if not approx:
            a = a.replace("≈", "=")
    return q, a, None


def chat_weekday(rng: random.Random):
    d = random_date(rng)
    q = rng.choice(
        [
            f"What day of the week is {fmt_date(d)}?",
            f"Which weekday does {fmt_date(d)} fall on?",
            f"On what day of the week is {fmt_date(d)}?",
        ]
    )

    def answer(x: dt.date) -> str:
        return f"{fmt_date(x)} is a {WEEKDAYS[x.weekday()]}."

    def follow(r: random.Random):
        d2 = random_date(r)
        return r.choice([f"What about {fmt_date(d2)}?", f"And {fmt_date(d2)}?"]), answer(d2)

    return q, answer(d), follow


def chat_date_math(rng: random.Random):
    d = random_date(rng)
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(1, 400)
        later = d + dt.timedelta(days=n)
        q = f"What date is {n} day{'s' if n != 1 else ''} after {fmt_date(d)}?"
        a = f"{n} day{'s' if n != 1 else ''} after {fmt_date(d)} is {fmt_date(later)} (a {WEEKDAYS[later.weekday()]})."
    elif kind == 1:
        d2 = d + dt.timedelta(days=rng.randint(2, 1500))
        n = (d2 - d).days
        q = f"How many days are there between {fmt_date(d)} and {fmt_date(d2)}?"
        a = f"There are {n} days from {fmt_date(d)} to {fmt_date(d2)}."
    else:
        y = rng.choice([rng.randint(1900, 2100), rng.choice([1900, 2000, 2100, 1600, 2400])])
        leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
        q = rng.choice(
            [
                f"Is {y} a leap year?",
                f"Was {y} a leap year?" if y < 2024 else f"Will {y} be a leap year?",
            ]
        )
        if y % 400 == 0:
            why = f"{y} is divisible by 400"
        elif y % 100 == 0:
            why = f"{y} is divisible by 100 but not by 400"
        elif y % 4 == 0:
            why = f"{y} is divisible by 4 and not by 100"
        else:
            why = f"{y} is not divisible by 4"
        a = f"{'Yes' if leap else 'No'}. {why}, so it {'is' if leap else 'is not'} a leap year."
    return q, a, None


def chat_word_problem(rng: random.Random):
    name, he = rng.choice(PEOPLE)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    He = he.capitalize()
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"{name} has {a} {item}. {He} gets {b} more. How many {item} does {he} have now?"
        ans = f"{a} + {b} = {a + b}, so {name} now has {a + b} {item}."
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        ans = f"{a} − {b} = {a - b}, so {name} has {a - b} {item} left."
    elif kind == 2:
        a, b = rng.randint(2, 15), rng.randint(2, 12)
        q = f"A box holds {a} {item}. How many {item} are there in {b} boxes?"
        ans = f"{b} × {a} = {a * b}, so there are {a * b} {item} in {b} boxes."
    elif kind == 3:
        each, people = rng.randint(2, 15), rng.randint(2, 9)
        total = each * people
        q = f"{name} shares {total} {item} equally among {people} friends. How many does each friend get?"
        ans = f"{total} ÷ {people} = {each}, so each friend gets {each} {item}."
    else:
        cents = rng.randint(25, 1500)
        price = Decimal(cents) / 100
        n = rng.randint(2, 9)
        total = price * n
        thing = rng.choice(["notebook", "sandwich", "ticket", "bus fare", "pen", "coffee"])
        q = f"One {thing} costs ${price:.2f}. How much do {n} of them cost?"
        ans = f"{n} × ${price:.2f} = ${total:.2f}, so {n} of them cost ${total:.2f}."
    return q, ans, None


def chat_spelling(rng: random.Random):
    w = rng.choice(WORDS)
    kind = rng.randrange(5)

    def answer(word: str, k: int) -> str:
        if k == 0:
            return f"'{word}' spelled backwards is '{word[::-1]}'."
        if k == 1:
            return f"{word}: " + "-".join(word.upper())
        if k == 2:
            return f"'{word}' has {len(word)} letters."
        if k == 3:
            pal = word == word[::-1]
            return (
                f"{'Yes' if pal else 'No'}. '{word}' reversed is '{word[::-1]}', so it "
                f"{'is' if pal else 'is not'} a palindrome."
            )
        ch = letter_for(word)
        n = word.count(ch)
        return f"The letter '{ch}' appears {n} time{'s' if n != 1 else ''} in '{word}'."

    def letter_for(word: str) -> str:
        return word[len(word) // 2]

    questions = [
        f"How do you spell '{w}' backwards?",
        f"Spell the word '{w}' letter by letter.",
        f"How many letters are in the word '{w}'?",
        f"Is '{w}' a palindrome?",
        f"How many times does the letter '{letter_for(w)}' appear in '{w}'?",
    ]

    def follow(r: random.Random):
        w2 = r.choice([x for x in WORDS if x != w])
        if kind == 4:
            return f"And the letter '{letter_for(w2)}' in '{w2}'?", answer(w2, kind)
        return f"Now do the same for '{w2}'.", answer(w2, kind)

    return questions[kind], answer(w, kind), follow


def chat_definition(rng: random.Random):
    term, definition = rng.choice(GLOSSARY)
    named = term if term in MASS_TERMS else ("an " if term[0] in "aeiou" else "a ") + term
    q = rng.choice(
        [
            f"What does '{term}' mean?",
            f"Define {term}.",
            f"Can you explain what {named} is in one sentence?",
            f"What is {named}?",
        ]
    )
    return q, f"{named[0].upper()}{named[1:]} is {definition}.", None


def chat_arithmetic(rng: random.Random):
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.randrange(3)
    if op == 0:
        return f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.", None
    if op == 1:
        return f"What is {a} minus {b}?", f"{a} − {b} = {a - b}.", None
    return f"What is {a} times {b}?", f"{a} × {b} = {a * b}.", None


# fmt: off
CHAT_TOPICS = [
    chat_conversion, chat_temperature, chat_weekday, chat_date_math, chat_word_problem,
    chat_spelling, chat_definition, chat_arithmetic,
]
# fmt: on


def chat_row(rng: random.Random) -> dict:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.45:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choices([1, 2, 3], weights=[50, 35, 15])[0]
    follow = None
    for _ in range(turns):
        if follow is not None and rng.random() < 0.6:
            q, a = follow(rng)
        else:
            q, a, follow = rng.choice(CHAT_TOPICS)(rng)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def make_chat(rng: random.Random) -> dict[str, list[dict]]:
    total = sum(n for _, n in CHAT_SPLITS)
    rows, _ = unique_rows(
        rng,
        lambda: chat_row(rng),
        total,
        key=lambda r: json.dumps(r["messages"], ensure_ascii=False),
    )
    return split(rows, CHAT_SPLITS)


# ---------------------------------------------------------------------------------------------
# Instruct: Alpaca-style tasks whose outputs are computed, so they are correct by construction
# ---------------------------------------------------------------------------------------------

# (singular, plural) nouns for sentences; the plural task only changes the subject.
# fmt: off
NOUNS = [
    ("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("box", "boxes"), ("city", "cities"),
    ("mouse", "mice"), ("person", "people"), ("bus", "buses"), ("leaf", "leaves"),
    ("baby", "babies"), ("teacher", "teachers"), ("bird", "birds"), ("student", "students"),
    ("tree", "trees"), ("woman", "women"), ("man", "men"), ("knife", "knives"),
    ("tomato", "tomatoes"), ("fox", "foxes"), ("farmer", "farmers"), ("goose", "geese"),
    ("library", "libraries"),
]
# fmt: on
# (third person singular, base form, complement)
VERBS = [
    ("sleeps", "sleep", "on the warm mat"),
    ("runs", "run", "across the field"),
    ("watches", "watch", "the evening news"),
    ("needs", "need", "a little more time"),
    ("has", "have", "a red door"),
    ("is", "are", "very quiet today"),
    ("waits", "wait", "by the gate"),
    ("carries", "carry", "a heavy bag"),
    ("sings", "sing", "every morning"),
    ("looks", "look", "tired after the trip"),
    ("goes", "go", "to the market on Sundays"),
    ("wants", "want", "something to eat"),
    ("was", "were", "late for the meeting"),
    ("does", "do", "the work carefully"),
]
# fmt: off
ADJECTIVES = [
    "small", "old", "busy", "happy", "tall", "clever", "noisy", "gentle", "young", "brave",
]
# fmt: on

SENTENCES_SUBJ = [
    "The old bridge",
    "My neighbor",
    "A small boat",
    "The school bus",
    "Our teacher",
    "The red kite",
    "A curious fox",
    "The night train",
    "My sister",
    "The garden gate",
]
SENTENCES_PRED = [
    "crossed the river at dawn",
    "waited patiently outside the station",
    "was painted bright blue last spring",
    "arrived an hour before the storm",
    "made a loud noise in the wind",
    "carried twelve passengers to the island",
    "opened slowly in the morning light",
    "stopped near the corner shop",
    "looked different after the rain",
    "moved quietly through the tall grass",
]

# fmt: off
FRUITS = [
    "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "kiwi",
    "melon", "orange", "fig", "lime", "apricot",
]
# fmt: on

UPPER_INSTR = [
    "Convert the following text to uppercase.",
    "Rewrite this text in all capital letters.",
]
LOWER_INSTR = [
    "Convert the following text to lowercase.",
    "Rewrite this text in all lowercase letters.",
]
SORT_ASC_INSTR = [
    "Sort these numbers in ascending order.",
    "Arrange the numbers from smallest to largest.",
]
SORT_DESC_INSTR = [
    "Sort these numbers in descending order.",
    "Arrange the numbers from largest to smallest.",
]
SUM_INSTR = ["Compute the sum of these numbers.", "Add up the following numbers."]
COUNT_INSTR = ["Count the words in the following sentence.", "How many words are in this sentence?"]
EXTRACT_INSTR = [
    "Extract all the numbers from the text.",
    "List the numbers that appear in this text.",
]
CSV_INSTR = [
    "Rewrite the following list as a comma-separated list.",
    "Turn this list into a single line of comma-separated items.",
]
MAX_INSTR = ["Find the largest number in the list.", "Which number in this list is the biggest?"]
ALPHA_INSTR = ["Put these words in alphabetical order.", "Sort the following words alphabetically."]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SENTENCES_SUBJ)} {rng.choice(SENTENCES_PRED)}."


def numbers(rng: random.Random, lo: int = 1, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(4, 8))]


def join(nums: list) -> str:
    return ", ".join(str(n) for n in nums)


def task_sort(rng: random.Random, inline: bool):
    nums = numbers(rng, 1, 500)
    desc = rng.random() < 0.4
    out = join(sorted(nums, reverse=desc))
    if inline:
        order = "from largest to smallest" if desc else "from smallest to largest"
        return f"Sort the numbers {join(nums)} {order}.", "", out
    return rng.choice(SORT_DESC_INSTR if desc else SORT_ASC_INSTR), join(nums), out


def task_case(rng: random.Random, inline: bool):
    text = sentence(rng)
    upper = rng.random() < 0.6
    out = text.upper() if upper else text.lower()
    if inline:
        return f'Write "{text}" in {"uppercase" if upper else "lowercase"}.', "", out
    return rng.choice(UPPER_INSTR if upper else LOWER_INSTR), text, out


def task_count_words(rng: random.Random, inline: bool):
    text = sentence(rng)
    if rng.random() < 0.4:
        text = text[:-1] + f" and {rng.choice(SENTENCES_PRED)}."
    out = str(len(text.split()))
    if inline:
        return f'How many words are in the sentence "{text}"?', "", out
    return rng.choice(COUNT_INSTR), text, out


def task_extract(rng: random.Random, inline: bool):
    name = rng.choice(PEOPLE)[0]
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(3, 400)
    text = rng.choice(
        [
            f"{name} bought {a} pencils and {b} erasers for {c} dollars.",
            f"The train left at {rng.randint(1, 12)} o'clock with {a} cars and {c} passengers.",
            f"In {rng.randint(1990, 2023)} the club had {c} members and won {a} of {a + b} games.",
            f"The recipe needs {a} eggs, {b} grams of butter and {c} grams of flour.",
            f"Room {c} has {a} chairs, {b} desks and {rng.randint(1, 9)} windows.",
        ]
    )
    nums = []
    for token in text.replace(",", " ").replace(".", " ").split():
        if token.isdigit():
            nums.append(token)
    out = ", ".join(nums)
    if inline:
        return f"Extract the numbers from this sentence: {text}", "", out
    return rng.choice(EXTRACT_INSTR), text, out


def task_celsius(rng: random.Random, inline: bool):
    c = rng.randint(-40, 120)
    f = Decimal(c) * 9 / 5 + 32
    out = f"{c} °C is {fmt_dec(f)} °F."
    if inline:
        return f"Convert {c} degrees Celsius to Fahrenheit.", "", out
    return "Convert this temperature from Celsius to Fahrenheit.", f"{c} °C", out


def task_plural(rng: random.Random, inline: bool):
    sing, plur = rng.choice(NOUNS)
    if rng.random() < 0.3:
        adj = rng.choice(ADJECTIVES)
        singular = f"This {sing} is {adj}."
        plural = f"These {plur} are {adj}."
    else:
        third, base, rest = rng.choice(VERBS)
        singular = f"The {sing} {third} {rest}."
        plural = f"The {plur} {base} {rest}."
    if inline:
        return f"Make this sentence plural: {singular}", "", plural
    return (
        rng.choice(["Make this sentence plural.", "Rewrite the sentence with a plural subject."]),
        singular,
        plural,
    )


def task_sum(rng: random.Random, inline: bool):
    nums = numbers(rng, 1, 250)
    if inline:
        if len(nums) > 2 and rng.random() < 0.5:
            nums = nums[:2]
            return f"Add {nums[0]} and {nums[1]}.", "", str(sum(nums))
        return f"What is the sum of {join(nums)}?", "", str(sum(nums))
    return rng.choice(SUM_INSTR), join(nums), str(sum(nums))


def task_csv(rng: random.Random, inline: bool):
    items = rng.sample(FRUITS, rng.randint(3, 6))
    out = ", ".join(items)
    style = rng.randrange(3)
    if inline:
        return f"Write the items {' / '.join(items)} as a comma-separated list.", "", out
    if style == 0:
        text = "\n".join(items)
    elif style == 1:
        text = "\n".join(f"- {x}" for x in items)
    else:
        text = "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))
    return rng.choice(CSV_INSTR), text, out


def task_max(rng: random.Random, inline: bool):
    nums = numbers(rng, 1, 999)
    if inline:
        return f"What is the largest of these numbers: {join(nums)}?", "", str(max(nums))
    return rng.choice(MAX_INSTR), join(nums), str(max(nums))


def task_alpha(rng: random.Random, inline: bool):
    words = rng.sample(WORDS, rng.randint(4, 7))
    out = ", ".join(sorted(words))
    if inline:
        return f"Sort these words alphabetically: {', '.join(words)}.", "", out
    return rng.choice(ALPHA_INSTR), ", ".join(words), out


def task_reverse(rng: random.Random, inline: bool):
    w = rng.choice(WORDS)
    if inline:
        return f"Reverse the letters of the word '{w}'.", "", w[::-1]
    return "Write the given word backwards.", w, w[::-1]


# fmt: off
INSTRUCT_TASKS = [
    task_sort, task_case, task_count_words, task_extract, task_celsius, task_plural, task_sum,
    task_csv, task_max, task_alpha, task_reverse,
]
# fmt: on


def instruct_row(rng: random.Random) -> dict[str, str]:
    task = rng.choice(INSTRUCT_TASKS)
    instruction, inp, out = task(rng, rng.random() < 1 / 3)
    return {"instruction": instruction, "input": inp, "output": out}


def make_instruct(rng: random.Random) -> dict[str, list[dict]]:
    total = sum(n for _, n in INSTRUCT_SPLITS)
    rows, _ = unique_rows(
        rng, lambda: instruct_row(rng), total, key=lambda r: r["instruction"] + "\x00" + r["input"]
    )
    return split(rows, INSTRUCT_SPLITS)


# ---------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------


def unique_rows(rng: random.Random, make, total: int, key) -> tuple[list[dict], dict]:
    """Draw rows until `total` distinct keys; splitting a list of distinct rows keeps splits disjoint."""
    rows: list[dict] = []
    seen: dict[str, None] = {}
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > total * 50:
            raise RuntimeError(f"could not draw {total} distinct rows")
        row = make()
        k = key(row)
        if k in seen:
            continue
        seen[k] = None
        rows.append(row)
    return rows, seen


def split(rows: list[dict], sizes: tuple[tuple[str, int], ...]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    start = 0
    for name, n in sizes:
        out[name] = rows[start : start + n]
        start += n
    return out


def datasets() -> dict[str, str]:
    """Relative path -> file content, for every bundled file."""
    files: dict[str, str] = {}
    builders = (("sql", make_sql, 1), ("chat", make_chat, 2), ("instruct", make_instruct, 3))
    for folder, build, offset in builders:
        for split_name, rows in build(random.Random(SEED + offset)).items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            files[f"{folder}/{split_name}.jsonl"] = text
    return files


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)


def check(root: Path) -> int:
    files = datasets()
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), files)
        bad = []
        for rel in files:
            fresh = (Path(tmp) / rel).read_bytes()
            committed = root / rel
            if not committed.is_file():
                bad.append(f"{rel}: missing")
            elif committed.read_bytes() != fresh:
                bad.append(f"{rel}: differs from the generator's output")
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print("run `python data/generate.py` to regenerate", file=sys.stderr)
        return 1
    print(f"ok: {len(files)} files match the generator")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if a committed file differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(HERE)
    files = datasets()
    write(HERE, files)
    for rel, text in files.items():
        print(f"wrote data/{rel}: {text.count(chr(10))} rows, {len(text.encode('utf-8'))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
