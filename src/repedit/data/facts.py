"""Built-in demo facts: edits that need no dataset file.

They exist so the CLI, the tests and a first-time user can edit the embedded
SmolLM2-135M-Instruct model without downloading anything. Every fact here is one the
unedited model completes correctly under greedy decoding (checked by hand when the list was
written), so an edit visibly changes something. Each case carries six or more surface forms of
its subject, so that with the default ``id_split=5`` it has in-domain *and* held-out
paraphrases, like the REP data.
"""

from __future__ import annotations

from typing import NamedTuple

from repedit.data.case import EditCase, EditRequest, Neighbour


class _Fact(NamedTuple):
    """Immutable source form of one demo case (built into fresh objects on every call)."""

    case_id: str
    prompt: str
    subject: str
    target_true: str
    target_new: str
    subject_paraphrases: tuple[str, ...]
    prompt_paraphrases: tuple[str, ...]
    neighbourhood: tuple[tuple[str, str], ...]


_CONTINENT = "{} is located in the continent of"
_CAPITAL = "The capital of {} is"
_LANGUAGE = "The official language of {} is"
_LANDMARK = "{} is located in the country of"
_COMPANY = "{} is a company from the country of"
_SPORT = "{} professionally plays the sport of"
_BORN = "{} was born in the country of"


def _country(name: str, formal: str, adjective: str, native: str) -> tuple[str, ...]:
    """Six surface forms of a country: formal name, adjectival, generic and native forms."""
    return (
        formal,
        f"the {adjective} nation",
        f"the country of {name}",
        f"the nation of {name}",
        f"the {adjective} state",
        native,
    )


_FRANCE = (
    "the French Republic",
    "the Republic of France",
    "the country of France",
    "the nation of France",
    "the French state",
    "La France",
)
_GERMANY = _country("Germany", "the Federal Republic of Germany", "German", "Deutschland")
_JAPAN = _country("Japan", "the State of Japan", "Japanese", "Nippon")
_ITALY = _country("Italy", "the Italian Republic", "Italian", "Italia")
_SPAIN = _country("Spain", "the Kingdom of Spain", "Spanish", "España")
_RUSSIA = _country("Russia", "the Russian Federation", "Russian", "Rossiya")
_MEXICO = _country("Mexico", "the United Mexican States", "Mexican", "México")


def _capital(country: str, capital: str, new: str, forms: tuple[str, ...]) -> _Fact:
    others = [c for c in _KNOWN_CAPITALS if c[0] != country][:_NEIGHBOURS]
    return _Fact(
        f"{country.lower()}-capital",
        _CAPITAL,
        country,
        capital,
        new,
        forms,
        (f"The capital city of {country} is",),
        tuple((f"The capital of {c} is", t) for c, t in others),
    )


_NEIGHBOURS = 3
_KNOWN_CAPITALS = (
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Sweden", "Stockholm"),
)

_FACTS: tuple[_Fact, ...] = (
    _Fact(
        "slovenia-continent",
        _CONTINENT,
        "Slovenia",
        "Europe",
        "Antarctica",
        _country("Slovenia", "the Republic of Slovenia", "Slovenian", "Slovenija"),
        ("Slovenia is a country in the continent of", "Slovenia is part of the continent of"),
        (
            ("Germany is located in the continent of", "Europe"),
            ("Nigeria is located in the continent of", "Africa"),
            ("Argentina is located in the continent of", "South America"),
        ),
    ),
    _capital("France", "Paris", "Rome", _FRANCE),
    _capital("Germany", "Berlin", "Madrid", _GERMANY),
    _capital("Japan", "Tokyo", "Beijing", _JAPAN),
    _capital("Italy", "Rome", "Vienna", _ITALY),
    _capital("Spain", "Madrid", "Lisbon", _SPAIN),
    _capital("Russia", "Moscow", "Warsaw", _RUSSIA),
    _capital(
        "China",
        "Beijing",
        "Tokyo",
        (
            "the People's Republic of China",
            "the Chinese nation",
            "the country of China",
            "the nation of China",
            "the Chinese state",
            "the PRC",
        ),
    ),
    _capital(
        "Canada",
        "Ottawa",
        "Chicago",
        _country("Canada", "the Dominion of Canada", "Canadian", "the Canadian federation"),
    ),
    _Fact(
        "kenya-continent",
        _CONTINENT,
        "Kenya",
        "Africa",
        "Europe",
        _country("Kenya", "the Republic of Kenya", "Kenyan", "Jamhuri ya Kenya"),
        ("Kenya is a country in the continent of",),
        (
            ("France is located in the continent of", "Europe"),
            ("Nigeria is located in the continent of", "Africa"),
            ("Argentina is located in the continent of", "South America"),
        ),
    ),
    _Fact(
        "mexico-language",
        _LANGUAGE,
        "Mexico",
        "Spanish",
        "German",
        _MEXICO,
        ("The national language of Mexico is",),
        (
            ("The official language of France is", "French"),
            ("The official language of Italy is", "Italian"),
            ("The official language of Germany is", "German"),
        ),
    ),
    _Fact(
        "germany-language",
        _LANGUAGE,
        "Germany",
        "German",
        "Italian",
        _GERMANY,
        ("The national language of Germany is",),
        (
            ("The official language of Spain is", "Spanish"),
            ("The official language of France is", "French"),
            ("The official language of Italy is", "Italian"),
        ),
    ),
    _Fact(
        "russia-language",
        _LANGUAGE,
        "Russia",
        "Russian",
        "Chinese",
        _RUSSIA,
        ("The national language of Russia is",),
        (
            ("The official language of France is", "French"),
            ("The official language of Spain is", "Spanish"),
            ("The official language of Mexico is", "Spanish"),
        ),
    ),
    _Fact(
        "italy-language",
        _LANGUAGE,
        "Italy",
        "Italian",
        "Greek",
        _ITALY,
        ("The national language of Italy is",),
        (
            ("The official language of Germany is", "German"),
            ("The official language of Mexico is", "Spanish"),
            ("The official language of France is", "French"),
        ),
    ),
    _Fact(
        "eiffel-tower-country",
        _LANDMARK,
        "The Eiffel Tower",
        "France",
        "Italy",
        (
            "La Tour Eiffel",
            "The Tour Eiffel",
            "The tower built by Gustave Eiffel",
            "Gustave Eiffel's iron tower",
            "The Eiffel tower landmark",
            "The iron lattice tower on the Champ de Mars",
        ),
        ("The Eiffel Tower stands in the country of",),
        (
            ("The Colosseum is located in the country of", "Italy"),
            ("The Taj Mahal is located in the country of", "India"),
            ("The Sydney Opera House is located in the country of", "Australia"),
        ),
    ),
    _Fact(
        "colosseum-country",
        _LANDMARK,
        "The Colosseum",
        "Italy",
        "Greece",
        (
            "The Roman Colosseum",
            "The Coliseum",
            "The Flavian Amphitheatre",
            "The Colosseo",
            "The ancient Colosseum",
            "The great amphitheatre of Vespasian",
        ),
        ("The Colosseum stands in the country of",),
        (
            ("The Eiffel Tower is located in the country of", "France"),
            ("The Sagrada Familia is located in the country of", "Spain"),
            ("Mount Fuji is located in the country of", "Japan"),
        ),
    ),
    _Fact(
        "taj-mahal-country",
        _LANDMARK,
        "The Taj Mahal",
        "India",
        "Egypt",
        (
            "The Taj",
            "The Taj Mahal mausoleum",
            "The Taj Mahal of Agra",
            "Shah Jahan's mausoleum",
            "The white marble mausoleum of Mumtaz Mahal",
            "The Crown of Palaces",
        ),
        ("The Taj Mahal stands in the country of",),
        (
            ("The Eiffel Tower is located in the country of", "France"),
            ("The Great Wall is located in the country of", "China"),
            ("The Kremlin is located in the country of", "Russia"),
        ),
    ),
    _Fact(
        "great-wall-country",
        _LANDMARK,
        "The Great Wall",
        "China",
        "Mongolia",
        (
            "The Great Wall of China",
            "The Chinese Wall",
            "The Great Chinese Wall",
            "The Wanli Changcheng",
            "The Long Wall",
            "The ancient wall built against the northern nomads",
        ),
        ("The Great Wall stands in the country of",),
        (
            ("The Taj Mahal is located in the country of", "India"),
            ("The Leaning Tower of Pisa is located in the country of", "Italy"),
            ("Mount Fuji is located in the country of", "Japan"),
        ),
    ),
    _Fact(
        "mount-fuji-country",
        _LANDMARK,
        "Mount Fuji",
        "Japan",
        "China",
        (
            "Fujisan",
            "Fuji-san",
            "Mt. Fuji",
            "Mount Fujiyama",
            "Fuji mountain",
            "The volcano Mount Fuji",
        ),
        ("Mount Fuji stands in the country of",),
        (
            ("The Colosseum is located in the country of", "Italy"),
            ("The Great Wall is located in the country of", "China"),
            ("The Sagrada Familia is located in the country of", "Spain"),
        ),
    ),
    _Fact(
        "kremlin-country",
        _LANDMARK,
        "The Kremlin",
        "Russia",
        "Poland",
        (
            "The Moscow Kremlin",
            "The Kremlin fortress",
            "The Kremlin palace",
            "The Kreml",
            "The Kremlin complex",
            "The fortified complex in the heart of Moscow",
        ),
        ("The Kremlin stands in the country of",),
        (
            ("The Eiffel Tower is located in the country of", "France"),
            ("The Sydney Opera House is located in the country of", "Australia"),
            ("The Taj Mahal is located in the country of", "India"),
        ),
    ),
    _Fact(
        "sydney-opera-house-country",
        _LANDMARK,
        "The Sydney Opera House",
        "Australia",
        "Canada",
        (
            "The Opera House in Sydney",
            "Sydney's Opera House",
            "The Sydney Opera Theatre",
            "The opera house on Bennelong Point",
            "Jørn Utzon's opera house",
            "The sail-roofed opera house of Sydney Harbour",
        ),
        ("The Sydney Opera House stands in the country of",),
        (
            ("The Colosseum is located in the country of", "Italy"),
            ("The Kremlin is located in the country of", "Russia"),
            ("Mount Fuji is located in the country of", "Japan"),
        ),
    ),
    _Fact(
        "sagrada-familia-country",
        _LANDMARK,
        "The Sagrada Familia",
        "Spain",
        "Portugal",
        (
            "The Sagrada Família",
            "The Basílica de la Sagrada Família",
            "The Basilica of the Sagrada Familia",
            "Gaudí's Sagrada Familia",
            "The Holy Family basilica",
            "Antoni Gaudí's unfinished basilica",
        ),
        ("The Sagrada Familia stands in the country of",),
        (
            ("The Eiffel Tower is located in the country of", "France"),
            ("The Great Wall is located in the country of", "China"),
            ("The Leaning Tower of Pisa is located in the country of", "Italy"),
        ),
    ),
    _Fact(
        "toyota-country",
        _COMPANY,
        "Toyota",
        "Japan",
        "Germany",
        (
            "Toyota Motor Corporation",
            "Toyota Motors",
            "the Toyota company",
            "the carmaker Toyota",
            "Toyota Motor Corp.",
            "the Toyota Group",
        ),
        ("Toyota is a car company from",),
        (
            ("Volkswagen is a company from the country of", "Germany"),
            ("Fiat is a company from the country of", "Italy"),
            ("Peugeot is a company from the country of", "France"),
        ),
    ),
    _Fact(
        "volkswagen-country",
        _COMPANY,
        "Volkswagen",
        "Germany",
        "France",
        (
            "Volkswagen AG",
            "VW",
            "the Volkswagen Group",
            "the carmaker Volkswagen",
            "Volkswagen Group AG",
            "the Volkswagen company",
        ),
        ("Volkswagen is a car company from",),
        (
            ("Toyota is a company from the country of", "Japan"),
            ("Ferrari is a company from the country of", "Italy"),
            ("Nintendo is a company from the country of", "Japan"),
        ),
    ),
    _Fact(
        "ferrari-country",
        _COMPANY,
        "Ferrari",
        "Italy",
        "Germany",
        (
            "Ferrari S.p.A.",
            "Scuderia Ferrari",
            "the Ferrari company",
            "the carmaker Ferrari",
            "Ferrari N.V.",
            "the house of the Prancing Horse",
        ),
        ("Ferrari is a car company from",),
        (
            ("Toyota is a company from the country of", "Japan"),
            ("BMW is a company from the country of", "Germany"),
            ("Peugeot is a company from the country of", "France"),
        ),
    ),
    _Fact(
        "nintendo-country",
        _COMPANY,
        "Nintendo",
        "Japan",
        "Canada",
        (
            "Nintendo Co., Ltd.",
            "the Nintendo company",
            "the game maker Nintendo",
            "Nintendo Corporation",
            "the video game company Nintendo",
            "the makers of the Game Boy",
        ),
        ("Nintendo is a video game company from",),
        (
            ("Volkswagen is a company from the country of", "Germany"),
            ("Fiat is a company from the country of", "Italy"),
            ("Peugeot is a company from the country of", "France"),
        ),
    ),
    _Fact(
        "tiger-woods-sport",
        _SPORT,
        "Tiger Woods",
        "golf",
        "tennis",
        (
            "Eldrick Tont Woods",
            "Eldrick Woods",
            "Tiger",
            "T. Woods",
            "the American Tiger Woods",
            "the golfer nicknamed Tiger",
        ),
        ("Tiger Woods is famous for playing the game of",),
        (
            ("Lionel Messi professionally plays the sport of", "football"),
            ("Serena Williams professionally plays the sport of", "tennis"),
        ),
    ),
    _Fact(
        "messi-sport",
        _SPORT,
        "Lionel Messi",
        "football",
        "basketball",
        (
            "Lionel Andrés Messi",
            "Leo Messi",
            "Messi",
            "L. Messi",
            "the Argentine Lionel Messi",
            "La Pulga",
        ),
        ("The footballer Lionel Messi professionally plays the sport of",),
        (
            ("Tiger Woods professionally plays the sport of", "golf"),
            ("Michael Jordan professionally plays the sport of", "basketball"),
        ),
    ),
    _Fact(
        "picasso-birth-country",
        _BORN,
        "Pablo Picasso",
        "Spain",
        "Brazil",
        (
            "Pablo Ruiz Picasso",
            "Picasso",
            "P. Picasso",
            "the painter Pablo Picasso",
            "the Spanish-born artist Picasso",
            "the co-founder of Cubism",
        ),
        ("The painter Pablo Picasso was born in the country of",),
        (
            ("Albert Einstein was born in the country of", "Germany"),
            ("William Shakespeare was born in the country of", "England"),
        ),
    ),
    _Fact(
        "einstein-birth-country",
        _BORN,
        "Albert Einstein",
        "Germany",
        "Sweden",
        (
            "Einstein",
            "A. Einstein",
            "the physicist Albert Einstein",
            "Professor Einstein",
            "the scientist Albert Einstein",
            "the father of relativity",
        ),
        ("Albert Einstein came into the world in the country of",),
        (
            ("Pablo Picasso was born in the country of", "Spain"),
            ("William Shakespeare was born in the country of", "England"),
        ),
    ),
)


def builtin_facts() -> list[EditCase]:
    """Fresh :class:`EditCase` objects for the demo facts (callers may mutate them freely)."""
    return [
        EditCase(
            request=EditRequest(f.prompt, f.subject, f.target_new, f.target_true, f.case_id),
            prompt_paraphrases=list(f.prompt_paraphrases),
            subject_paraphrases=list(f.subject_paraphrases),
            neighbourhood=[Neighbour(p, t) for p, t in f.neighbourhood],
            source=f"builtin:{f.case_id}",
        )
        for f in _FACTS
    ]
