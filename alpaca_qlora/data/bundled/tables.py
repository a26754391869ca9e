"""Hand-written fact tables, where pycountry and periodictable say nothing.

Only entries that are uncontested today are listed: facts that are disputed, recently changed or ambiguous are left
out rather than guessed (countries with more than one legal tender, countries whose seat of government is contested,
elements whose state or metal class depends on the source).
"""
from __future__ import annotations

# ISO 3166-1 alpha-2 -> capital city. Left out on purpose (several capitals, a contested or moving seat of government):
# Bolivia, Netherlands, South Africa, Israel, Côte d'Ivoire, Benin, Sri Lanka, Switzerland, Burundi, Montenegro,
# Myanmar, Sudan, Yemen, Eswatini, Malaysia, Tanzania, Indonesia, Egypt, Equatorial Guinea.
CAPITALS: dict[str, str] = {
    "AE": "Abu Dhabi", "AF": "Kabul", "AL": "Tirana", "AM": "Yerevan", "AO": "Luanda", "AR": "Buenos Aires",
    "AT": "Vienna", "AU": "Canberra", "AZ": "Baku", "BA": "Sarajevo", "BD": "Dhaka", "BE": "Brussels",
    "BG": "Sofia", "BH": "Manama", "BR": "Brasília", "BT": "Thimphu", "BW": "Gaborone", "BY": "Minsk",
    "CA": "Ottawa", "CL": "Santiago", "CM": "Yaoundé", "CN": "Beijing", "CO": "Bogotá", "CR": "San José",
    "CU": "Havana", "CY": "Nicosia", "CZ": "Prague", "DE": "Berlin", "DK": "Copenhagen", "DZ": "Algiers",
    "EC": "Quito", "EE": "Tallinn", "ES": "Madrid", "ET": "Addis Ababa", "FI": "Helsinki",
    "FJ": "Suva", "FR": "Paris", "GB": "London", "GE": "Tbilisi", "GH": "Accra", "GR": "Athens",
    "GT": "Guatemala City", "HN": "Tegucigalpa", "HR": "Zagreb", "HU": "Budapest", "IE": "Dublin",
    "IN": "New Delhi", "IQ": "Baghdad", "IR": "Tehran", "IS": "Reykjavík", "IT": "Rome", "JM": "Kingston",
    "JO": "Amman", "JP": "Tokyo", "KE": "Nairobi", "KG": "Bishkek", "KH": "Phnom Penh", "KP": "Pyongyang",
    "KR": "Seoul", "KW": "Kuwait City", "KZ": "Astana", "LA": "Vientiane", "LB": "Beirut", "LT": "Vilnius",
    "LV": "Riga", "LY": "Tripoli", "MA": "Rabat", "MD": "Chișinău", "MG": "Antananarivo", "MK": "Skopje",
    "ML": "Bamako", "MN": "Ulaanbaatar", "MT": "Valletta", "MX": "Mexico City", "MZ": "Maputo", "NA": "Windhoek",
    "NE": "Niamey", "NG": "Abuja", "NI": "Managua", "NO": "Oslo", "NP": "Kathmandu", "NZ": "Wellington",
    "OM": "Muscat", "PA": "Panama City", "PE": "Lima", "PG": "Port Moresby", "PH": "Manila", "PK": "Islamabad",
    "PL": "Warsaw", "PT": "Lisbon", "PY": "Asunción", "QA": "Doha", "RO": "Bucharest", "RS": "Belgrade",
    "RU": "Moscow", "RW": "Kigali", "SA": "Riyadh", "SE": "Stockholm", "SI": "Ljubljana", "SK": "Bratislava",
    "SN": "Dakar", "SY": "Damascus", "TH": "Bangkok", "TJ": "Dushanbe", "TM": "Ashgabat", "TN": "Tunis",
    "TR": "Ankara", "UA": "Kyiv", "UG": "Kampala", "US": "Washington, D.C.", "UY": "Montevideo",
    "UZ": "Tashkent", "VE": "Caracas", "VN": "Hanoi", "WS": "Apia", "ZM": "Lusaka", "ZW": "Harare",
}

# ISO 3166-1 alpha-2 -> ISO 4217 code of the country's sole legal tender. Left out on purpose (more than one legal
# tender, a recent change, or a currency in name only): Bahamas, Bhutan, Bulgaria, Cambodia, Cuba, El Salvador,
# Eswatini, Guatemala, Haiti, Lesotho, Liberia, Macao, Namibia, Nepal, Panama, Singapore, Brunei, Venezuela, Zimbabwe.
_EURO_AREA = ("AD", "AT", "BE", "CY", "DE", "EE", "ES", "FI", "FR", "GR", "HR", "IE", "IT", "LT", "LU", "LV",
              "MC", "ME", "MT", "NL", "PT", "SI", "SK", "SM", "VA")
_CFA_WEST = ("BF", "BJ", "CI", "GW", "ML", "NE", "SN", "TG")
_CFA_CENTRAL = ("CF", "CG", "CM", "GA", "GQ", "TD")
COUNTRY_CURRENCIES: dict[str, str] = {
    **{code: "EUR" for code in _EURO_AREA},
    **{code: "XOF" for code in _CFA_WEST},
    **{code: "XAF" for code in _CFA_CENTRAL},
    "AE": "AED", "AF": "AFN", "AL": "ALL", "AM": "AMD", "AO": "AOA", "AR": "ARS", "AU": "AUD", "AZ": "AZN",
    "BA": "BAM", "BB": "BBD", "BD": "BDT", "BH": "BHD", "BI": "BIF", "BO": "BOB", "BR": "BRL", "BW": "BWP",
    "BY": "BYN", "BZ": "BZD", "CA": "CAD", "CD": "CDF", "CH": "CHF", "CL": "CLP", "CN": "CNY", "CO": "COP",
    "CR": "CRC", "CV": "CVE", "CZ": "CZK", "DJ": "DJF", "DK": "DKK", "DO": "DOP", "DZ": "DZD",
    "EC": "USD", "EG": "EGP", "ER": "ERN", "ET": "ETB", "FJ": "FJD", "GB": "GBP", "GE": "GEL", "GH": "GHS",
    "GM": "GMD", "GN": "GNF", "GY": "GYD", "HK": "HKD", "HN": "HNL", "HU": "HUF", "ID": "IDR",
    "IL": "ILS", "IN": "INR", "IQ": "IQD", "IR": "IRR", "IS": "ISK", "JM": "JMD", "JO": "JOD", "JP": "JPY",
    "KE": "KES", "KG": "KGS", "KM": "KMF", "KP": "KPW", "KR": "KRW", "KW": "KWD", "KZ": "KZT", "LA": "LAK",
    "LB": "LBP", "LI": "CHF", "LK": "LKR", "LY": "LYD", "MA": "MAD", "MD": "MDL", "MG": "MGA", "MK": "MKD",
    "MM": "MMK", "MN": "MNT", "MR": "MRU", "MU": "MUR", "MV": "MVR", "MW": "MWK", "MX": "MXN", "MY": "MYR",
    "MZ": "MZN", "NG": "NGN", "NI": "NIO", "NO": "NOK", "NZ": "NZD", "OM": "OMR", "PE": "PEN", "PG": "PGK",
    "PH": "PHP", "PK": "PKR", "PL": "PLN", "PY": "PYG", "QA": "QAR", "RO": "RON", "RS": "RSD", "RU": "RUB",
    "RW": "RWF", "SA": "SAR", "SB": "SBD", "SC": "SCR", "SD": "SDG", "SE": "SEK", "SL": "SLE", "SO": "SOS",
    "SR": "SRD", "SS": "SSP", "ST": "STN", "SY": "SYP", "TH": "THB", "TJ": "TJS", "TM": "TMT", "TN": "TND",
    "TO": "TOP", "TR": "TRY", "TT": "TTD", "TW": "TWD", "TZ": "TZS", "UA": "UAH", "UG": "UGX", "US": "USD",
    "UY": "UYU", "UZ": "UZS", "VN": "VND", "VU": "VUV", "WS": "WST", "YE": "YER", "ZA": "ZAR", "ZM": "ZMW",
}

# ISO 4217 entries that are funds, precious metals, bond-market units, testing or "no currency" codes.
NON_CURRENCY_CODES = frozenset({
    "BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW", "XAD", "XAG", "XAU", "XBA", "XBB", "XBC",
    "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX",
})

# States of matter at room temperature (25 °C) for elements 1-92. Gallium and caesium (melting near room
# temperature), astatine and francium (never observed in bulk) are left out; all others not listed are solids.
GASES = frozenset({"H", "He", "N", "O", "F", "Ne", "Cl", "Ar", "Kr", "Xe", "Rn"})
LIQUIDS = frozenset({"Br", "Hg"})
STATE_UNSETTLED = frozenset({"Ga", "Cs", "At", "Fr"})

# Metal / nonmetal / metalloid for elements 1-92 (the six commonly recognised metalloids). Selenium, polonium and
# astatine are classed differently by different sources and are left out; all others not listed are metals.
NONMETALS = frozenset({"H", "He", "C", "N", "O", "F", "Ne", "P", "S", "Cl", "Ar", "Br", "Kr", "I", "Xe", "Rn"})
METALLOIDS = frozenset({"B", "Si", "Ge", "As", "Sb", "Te"})
CLASS_UNSETTLED = frozenset({"Se", "Po", "At"})

# Element families (the superheavy members tennessine and oganesson are left out: their chemistry is unknown).
FAMILIES: dict[str, tuple[str, ...]] = {
    "alkali metal": ("Li", "Na", "K", "Rb", "Cs", "Fr"),
    "alkaline earth metal": ("Be", "Mg", "Ca", "Sr", "Ba", "Ra"),
    "halogen": ("F", "Cl", "Br", "I", "At"),
    "noble gas": ("He", "Ne", "Ar", "Kr", "Xe", "Rn"),
}
LANTHANIDES = range(57, 72)
ACTINIDES = range(89, 104)
PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)
CLASSIFIED_MAX_NUMBER = 92  # states and metal classes are only asked for the naturally studied elements

# Which ISO 3166-2 subdivisions are asked about, and how they are named in a question.
REGION_KINDS: dict[tuple[str, str], str] = {
    ("US", "State"): "the US state of",
    ("CA", "Province"): "the Canadian province of",
    ("CA", "Territory"): "the Canadian territory of",
    ("AU", "State"): "the Australian state of",
    ("AU", "Territory"): "the Australian territory",
    ("BR", "State"): "the Brazilian state of",
    ("IN", "State"): "the Indian state of",
    ("MX", "State"): "the Mexican state of",
    ("DE", "Land"): "the German state of",
}
