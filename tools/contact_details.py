"""Contact and identifying details (phone, e-mail, address, ids, handles, links): find them, so they are never stored.

Anything in a viewer's memory can be read aloud on a live stream, and reading out where a
viewer lives or how to reach them is the worst thing an AI streamer can do. So the memory
tools refuse a fact that carries such a detail (find_contact_detail, contact_detail_error),
and the bridge hides it in platform fields such as display names (redact_contact_details).

Uploaded to Letta ahead of the memory tools (see `tools.tool_source`), so the rules at the
top of tools/human_block.py apply: standard library only, no `from __future__`, top-level
functions and constants only (no nested def, no class), and no top-level name that a tool
argument or the sandbox uses. Every top-level name here starts with CONTACT_ or contact_
(or is one of the three public functions), so it cannot clash with human_block's names
either when both are pasted into one source.

How it reads a text: NFKC first, character by character so that every position maps back to
the original (full-width digits and ＠, circled digits), format characters (zero-width
spaces) dropped; a second view spells Chinese numerals as digits (一三八… is a phone number).
Dates, times and year ranges are masked before digit runs are judged, so "2019-2023",
"1999.03.03" and "12:30" are not numbers. Then detectors run in a fixed order (the first
that fires names the kind):

- e-mail (plain, "name at gmail dot com", "name[at]qq[dot]com", "name艾特qq点com");
- links (scheme, www., domain.tld/path, shorteners such as t.me/x and bit.ly/x);
- IP addresses and GPS positions;
- messaging ids and social handles given with a platform name (微信/QQ/LINE/Discord/Telegram,
  Twitter/Instagram/抖音/B站 ...) when a marker ("号", "ID", ":", "is") or an add-me phrase
  shows an id follows, Discord tags (foo#1234) and @handles;
- passwords and verification codes; passport-like ids (E12345678);
- numbers: a phone-like run of >= 7 digits (spaces, dots, dashes, brackets, +) unless it is a
  decimal or a count (followed by "points", "元", "views" ...; after a currency sign), named by
  its context (身份证, card, QQ, 邮编 ...) or its length (18 with X: ID; 15-19: bank card;
  otherwise phone); 4+ digits right after a phone/ID/card/postal word ("手机尾号5678");
  digits spelled as English words;
- street addresses (123 Main St, Apt 4B, 建国路88号, 5号楼3单元, 1203室, 神南1-2-3, 1丁目2番3号,
  101号室, 〒150-0041, "address is ..."), and home locations ("I live at ...", "lives on Baker
  Street", "住在阳光小区"). A city or district alone is not a detail: "lives in Shanghai" passes.

What it lets through on purpose is listed with the corpus (tests/unit/contact_corpus.py); what
it refuses on purpose although harmless: any 7+ digit number without a count word or currency
("bought it for 1299000", the song "867-5309", video ids like av12345678), a list of small
numbers separated only by spaces ("2 3 5 7 11 13"), every @handle (also a streamer's), game
UIDs and friend codes (they find the viewer's account), a named housing compound even as a
landmark ("住在阳光小区附近").
"""

import re
import unicodedata

CONTACT_PLACEHOLDER = "[hidden]"

# Every kind find_contact_detail can return.
CONTACT_KINDS = (
    "e-mail address", "link", "IP address", "GPS position", "messaging id", "social handle",
    "password", "ID number", "bank card number", "phone number", "account ID", "postal code",
    "street address", "home location",
)

# People spell phone numbers digit by digit in Chinese numerals (幺 is "one" when dictating).
CONTACT_NUMERAL_DIGITS = {
    "〇": "0", "零": "0", "一": "1", "幺": "1", "壹": "1", "二": "2", "贰": "2", "貳": "2",
    "三": "3", "叁": "3", "四": "4", "肆": "4", "五": "5", "伍": "5", "六": "6", "陆": "6", "陸": "6",
    "七": "7", "柒": "7", "八": "8", "捌": "8", "九": "9", "玖": "9",
}

CONTACT_TLDS = (
    r"(?:com|net|org|edu|gov|info|biz|io|me|gg|tv|cn|jp|kr|tw|hk|sg|uk|us|ca|au|de|fr|ru|in|co|ly|xyz|"
    r"top|cc|app|dev|link|site|online|store|shop|page|live|art|blog|moe|fm|to|be|ee|la|gl|so|sh|ai|club|"
    r"fun|vip|space|pw|ws|ac)"
)

# ---- e-mail ----
CONTACT_EMAIL = re.compile(r"(?<![\w.+\-])[\w.+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
CONTACT_AT_WRITTEN = r"(?:\s*@\s*|\s*[\[({<【（]\s*(?:at|@|艾特)\s*[\])}>】）]\s*|\s*(?:艾特|圈a)\s*)"
CONTACT_AT_SPOKEN = r"\s+at\s+"
CONTACT_MAIL_PROVIDERS = (
    r"(?:gmail|googlemail|qq|foxmail|163|126|yeah|sina|sohu|yahoo|outlook|hotmail|live|msn|icloud|me|aol|"
    r"proton|protonmail|pm|yandex|naver|daum|docomo|ezweb|softbank|gmx|mail)"
)
CONTACT_DOT_WRITTEN = r"(?:\s*\.\s*|\s*[\[({<【（]\s*(?:dot|\.|点|點)\s*[\])}>】）]\s*|\s+dot\s+|\s*(?:点|點|。)\s*)"
CONTACT_DOT_SPOKEN = r"(?:\s*[\[({<【（]\s*(?:dot|\.|点|點)\s*[\])}>】）]\s*|\s+dot\s+|\s*(?:点|點)\s*)"
CONTACT_EMAIL_LOCAL = r"(?<![A-Za-z0-9_.+\-])[A-Za-z0-9][A-Za-z0-9_.+\-]*"
CONTACT_EMAIL_DOMAIN = r"[A-Za-z0-9\-]+"
# Three ways to spell an address out. "name[at]qq[dot]com", "name艾特qq点com", "name @ gmail . com":
# a written at, any dot. "name at gmail dot com": a spoken at needs a spoken dot, so that
# "studies at ucla.edu" is not an address, unless a mail provider follows ("name at gmail.com").
CONTACT_EMAIL_SPELLED = re.compile(
    CONTACT_EMAIL_LOCAL + r"(?:"
    + CONTACT_AT_WRITTEN + CONTACT_EMAIL_DOMAIN + r"(?:" + CONTACT_DOT_WRITTEN + CONTACT_EMAIL_DOMAIN + r")*?"
    + CONTACT_DOT_WRITTEN
    + r"|" + CONTACT_AT_SPOKEN + CONTACT_EMAIL_DOMAIN + r"(?:" + CONTACT_DOT_SPOKEN + CONTACT_EMAIL_DOMAIN + r")*?"
    + CONTACT_DOT_SPOKEN
    + r"|" + CONTACT_AT_SPOKEN + CONTACT_MAIL_PROVIDERS + CONTACT_DOT_WRITTEN
    + r"(?:[A-Za-z]{2,3}" + CONTACT_DOT_WRITTEN + r")?"
    + r")" + CONTACT_TLDS + r"(?![A-Za-z])",
    re.IGNORECASE,
)
CONTACT_EMAIL_WORD = r"(?:e-?mail|邮箱|郵箱|电邮|電郵|メアド|メールアドレス|メール|gmail|qq邮箱)"

# ---- links ----
CONTACT_LINK = re.compile(
    r"(?:https?|ftp)://\S+"
    r"|(?<![A-Za-z0-9@.\-])www\d?\.[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+\S*"
    r"|(?<![A-Za-z0-9@.\-])(?:[A-Za-z0-9\-]+\.)+" + CONTACT_TLDS + r"/[^\s，。、]*"
    r"|(?<![A-Za-z0-9@.\-])(?:t\.me|wa\.me|bit\.ly|discord\.gg|linktr\.ee|b23\.tv|youtu\.be|goo\.gl|"
    r"tinyurl\.com|lit\.link|bio\.link|x\.gd|is\.gd|dwz\.cn|url\.cn)\s*/?\s*[A-Za-z0-9_\-]{3,}"
    r"|(?<![A-Za-z0-9@.\-])(?:[A-Za-z0-9\-]+\.)+(?:github\.io|carrd\.co|neocities\.org|blogspot\.com|"
    r"wordpress\.com|tumblr\.com|lofter\.com|fanbox\.cc|booth\.pm|substack\.com)(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9@.\-])[A-Za-z0-9\-]{2,}\s*[\[(（【]\s*(?:dot|\.|点|點)\s*[\])）】]\s*" + CONTACT_TLDS + r"(?![A-Za-z])",
    re.IGNORECASE,
)

# ---- numbers that are not digits of a number ----
CONTACT_IP = re.compile(r"(?<![A-Za-z0-9.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")
CONTACT_GPS = re.compile(r"(?<![\d.])-?\d{1,3}\.\d{3,}\s*[,，]\s*-?\d{1,3}\.\d{3,}(?![\d.])")

# ---- platform ids and handles ----
CONTACT_MESSAGING_PLATFORMS = (
    r"wechat|weixin|微信|威信|薇信|v信|vx|wx|qq|telegram|电报|電報|tg|discord|kakao(?:talk)?|카톡|whatsapp|"
    r"skype|signal|钉钉|釘釘|line|ライン|snapchat|snap"
)
CONTACT_SOCIAL_PLATFORMS = (
    r"twitter|推特|ツイッター|instagram|insta|ig|インスタ|tiktok|抖音|快手|小红书|小紅書|微博|weibo|bilibili|b站|"
    r"youtube|油管|twitch|github|reddit|facebook|fb|threads|bluesky|bsky|pixiv|steam|psn|xbox|roblox|epic|"
    r"mastodon|niconico|ニコニコ|tumblr|lofter|douyin|kuaishou|xiaohongshu|patreon|linkedin|x"
)
CONTACT_MESSAGING_NAMES = re.compile(r"(?:" + CONTACT_MESSAGING_PLATFORMS + r")", re.IGNORECASE)
# Platform names that are also ordinary words: an id follows only after an id marker or an add-me phrase.
CONTACT_AMBIGUOUS_PLATFORMS = frozenset({"x", "ig", "tg", "fb", "line", "signal", "snap", "steam", "threads", "epic"})
CONTACT_PLATFORM_ID = re.compile(
    r"(?<![A-Za-z])(?P<platform>" + CONTACT_MESSAGING_PLATFORMS + r"|" + CONTACT_SOCIAL_PLATFORMS + r")"
    r"(?:(?<=[A-Za-z])(?![A-Za-z])|(?<![A-Za-z]))"
    r"\s*(?P<label>id|handle|user\s?name|user\s?id|name|account|acc|number|no\.?|"
    r"号码|號碼|号|號|账号|賬號|帐号|帳號|用户名|用戶名|アカウント|ユーザー名|ユーザーid)?"
    r"\s*(?P<marker>is|是|は|为|為|:|=)?"
    r"\s*@?(?P<token>[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}(?:#\d{4})?)",
    re.IGNORECASE,
)
CONTACT_FIND_ME = re.compile(
    r"find me|follow me|add me|dm me|message me|msg me|text me|hit me up|reach me|contact me|look me up|"
    r"search (?:for )?me|friend me|加我|加一下|加个|加個|关注我|關注我|搜我|私信我|私聊|找我|联系我|聯繫我|加好友|"
    r"フォロー|追加して|検索して|連絡して",
    re.IGNORECASE,
)
# Words that follow "my twitter is ..." without being an id.
CONTACT_PLAIN_WORDS = frozenset("""
a an the my his her their our your its is are was be been not no so too very really also just only mostly
mainly always often sometimes never still now new old down up off on in at for with and or but about like
private public locked banned blocked suspended deleted hacked broken dead gone empty inactive active full
slow laggy fun great good bad cool nice boring annoying better worse best worst popular famous big small
same different there here this that it them him me you us account app game games group groups server
servers channel stream streams streaming video videos music art memes friends people mine hers theirs
open closed free paid english chinese japanese korean offline online live dm dms pm everything nothing
something anything because since when where how what who which if than then more less most least well
okay ok fine lol yes yeah nope all every one two some any many much lot lots unknown secret hidden name
id handle username number call calls chat chats voice pay wallet premium prime nitro music official
""".split())
CONTACT_DISCORD_TAG = re.compile(r"(?<![A-Za-z0-9_.#])[A-Za-z0-9_.]{2,32}#\d{4}(?!\d)")
CONTACT_AT_HANDLE = re.compile(r"(?<![A-Za-z0-9_.@])@(?P<token>[A-Za-z0-9_](?:[A-Za-z0-9_.]{0,29}[A-Za-z0-9_]))")
CONTACT_AT_NOT_HANDLE = re.compile(
    r"\d+(?::\d\d)?(?:am|pm|h)?|home|work|school|night|noon|lunch|everyone|here|all", re.IGNORECASE
)
CONTACT_EMAIL_ID = re.compile(
    CONTACT_EMAIL_WORD + r"\s*(?:address|地址|アドレス)?\s*(?:is|是|は|为|:|=)\s*(?P<token>[A-Za-z0-9][\w.+\-]{2,})",
    re.IGNORECASE,
)

# ---- secrets and ids ----
CONTACT_PASSWORD = re.compile(
    r"(?<![A-Za-z])(?:password|passwd|pwd|pin(?:\s*code)?|passcode|密码|密碼|口令|パスワード|暗証番号|"
    r"验证码|驗證碼|認証コード|verification code|otp)\s*(?:is|是|は|为|為|:|=)?\s*(?P<token>[^\s，。、,]{3,})",
    re.IGNORECASE,
)
CONTACT_PASSPORT = re.compile(r"(?<![A-Za-z0-9])[A-Z]{1,2}\d{7,9}(?![A-Za-z0-9])")

# ---- numbers ----
CONTACT_TIME = re.compile(r"(?<!\d)\d{1,2}:\d\d(?::\d\d)?(?!\d)")
CONTACT_DATE = re.compile(
    r"(?<![\d.])(?<![\d.][ \-])(?:"
    r"(?:19|20)\d\d(?P<s1>[-./])(?:0?[1-9]|1[0-2])(?P=s1)(?:0?[1-9]|[12]\d|3[01])"
    r"|(?:19|20)\d\d\s*年\s*(?:0?[1-9]|1[0-2])\s*月(?:\s*(?:0?[1-9]|[12]\d|3[01])\s*[日号號])?"
    r"|(?:0?[1-9]|[12]\d|3[01])(?P<s2>[-./])(?:0?[1-9]|[12]\d|3[01])(?P=s2)(?:19|20)\d\d"
    r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    r"|(?:19|20)\d\d\s?[-–—~〜/]\s?(?:(?:19|20)\d\d|\d\d)"
    r"|(?:19|20)\d\d(?:\s+(?:19|20)\d\d)+"
    r")(?!\d|\s?[-./]\s?\d)"
)
CONTACT_DIGIT_SEPARATORS = "\\s\\-.()/\u30fc\u2010-\u2015\u2212"
CONTACT_DIGIT_RUN = re.compile(
    r"\+?\d(?:[" + CONTACT_DIGIT_SEPARATORS + r"]{0,3}\d)*(?:[ \-]?[Xx](?![A-Za-z]))?"
)
CONTACT_COUNT_AFTER = re.compile(
    r"\s*(?:points?|pts|scores?|分|点|點|views?|plays?|followers?|fans|粉丝|粉絲|likes|次|回|个|個|人|元|块|塊|円|"
    r"yen|jpy|rmb|cny|usd|dollars?|bucks|coins?|gold|金币|金幣|钻石|鑽石|原石|石|exp|xp|damage|dmg|伤害|傷害|"
    r"hp|mp|years?|岁|歲|歳|年|hours?|hrs?|小时|小時|時間|minutes?|mins?|分钟|分鐘|秒|km|kg|cm|mm|steps?|步|"
    r"words?|字|gems?|primogems?|stars?|星|票|votes?|subscribers?|members?|ml|mah|fps|dpi|hz|px|万|萬|亿|億|"
    r"千|k|m|mb|gb|tb|times|x|people|persons|viewers|users|players|members|kills|wins|games|matches)(?![A-Za-z])",
    re.IGNORECASE,
)
CONTACT_COUNT_BEFORE = re.compile(
    r"(?<![A-Za-z])(?:exp|xp|hp|mp|damage|dmg|score[sd]?|points|pts|rank(?:ed)?|level|lv|power|combo|"
    r"战力|戰力|伤害|傷害|分数|分數|得分|积分|積分|经验|經驗|血量|スコア|ダメージ|経験値|戦闘力)\s*(?:of|is|[:：=#])?\s*$",
    re.IGNORECASE,
)
CONTACT_CURRENCY_BEFORE = re.compile(r"(?:[$¥€£₩￥]|rmb|usd|jpy|cny|hkd|twd)\s*$", re.IGNORECASE)
CONTACT_NUMBER_CONTEXT = (
    ("e-mail address", re.compile(CONTACT_EMAIL_WORD, re.IGNORECASE)),
    ("messaging id", re.compile(
        r"qq|微信|wechat|weixin|vx|wx|(?<![a-z])line|ライン|telegram|discord|kakao|whatsapp|skype|钉钉", re.IGNORECASE)),
    ("postal code", re.compile(r"邮编|郵編|邮政编码|郵便番号|〒|zip|postal|post\s?code", re.IGNORECASE)),
    ("ID number", re.compile(
        r"身份证|身分証|身份證|id card|identity card|证件|證件|护照|護照|passport|パスポート|ssn|social security|社会保障|社保|マイナンバー|"
        r"個人番号|免許|驾照|驾驶证|駕照|licen[cs]e|学号|學號|工号|student|employee|(?<![a-z])id(?![a-z])",
        re.IGNORECASE)),
    ("bank card number", re.compile(
        r"银行卡|銀行卡|卡号|卡號|信用卡|储蓄卡|借记卡|credit|debit|(?<![a-z])card|カード|口座|account number|"
        r"账户|帳戶|帐户|iban|cvv|支付宝|支付寶|alipay|paypal", re.IGNORECASE)),
    ("account ID", re.compile(r"uid|账号|賬號|帐号|帳號|アカウント|friend code|好友码|フレンドコード", re.IGNORECASE)),
    ("phone number", re.compile(
        r"电话|電話|手机|手機|携帯|ケータイ|(?<![a-z])phone|(?<![a-z])tel|(?<![a-z])cell|mobile|call|短信|sms",
        re.IGNORECASE)),
)
CONTACT_SHORT_NUMBER = re.compile(
    r"(?:(?<![A-Za-z])(?:phone|tel|cell|mobile|card|pin|passport|ssn|zip|postal|post\s?code|qq|uid|cvv)"
    r"\s*(?:number|no\.?|#|num|code|id)?\s*(?:is|:|=|ends?\s+(?:in|with))?"
    r"|(?:电话|電話|手机|手機|携帯|身份证|身份證|身分証|护照|護照|卡号|卡號|银行卡|信用卡|邮编|郵編|郵便番号|〒|マイナンバー|"
    r"個人番号|学号|工号|qq)"
    r"[\s:是为為は号號码碼尾后後四位末下桁の番]{0,6})"
    r"\s*(?P<digits>\d(?:[\s\-]?\d){3,})(?![\dA-Za-z])",
    re.IGNORECASE,
)
CONTACT_DIGIT_WORDS = re.compile(
    r"(?<![A-Za-z])(?:(?:zero|oh|one|two|three|four|five|six|seven|eight|nine|\d)[\s,\-]+){6,}"
    r"(?:zero|oh|one|two|three|four|five|six|seven|eight|nine|\d)(?![A-Za-z])",
    re.IGNORECASE,
)

# ---- addresses ----
CONTACT_STREET_SUFFIX = (
    r"(?i:street|st|road|rd|avenue|ave|boulevard|blvd|lane|ln|drive|dr|court|ct|place|pl|terrace|ter|"
    r"crescent|cres|highway|hwy|parkway|pkwy|square|sq|way|close|circle|cir|row|alley|trail|trl|mews)"
)
CONTACT_EN_STREET = re.compile(
    r"(?<![\d.])\d{1,5}[A-Za-z]?(?:-\d{1,5})?,?\s+(?:[A-Z][A-Za-z'\-]*\.?\s+){1,3}" + CONTACT_STREET_SUFFIX + r"\b\.?"
    r"|(?<![\d.])\d{1,5}\s+(?:[a-z]+\s+){1,2}(?:st|rd|ave|blvd|ln)\b\.?(?=\s*(?:$|[,.;!?]))"
    r"|\b(?i:apt|apartment)\.?\s*#?\s*\d{1,5}[A-Za-z]?\b"
    r"|\b(?i:suite|ste)\.?\s*#?\s*\d{2,5}[A-Za-z]?\b"
    r"|\b(?:Flat|Unit)\s+\d{1,4}[A-Za-z]?\b"
    r"|(?<![A-Za-z0-9])#\d{2}-\d{2,4}\b"
    r"|\b(?i:p\.?\s?o\.?\s*box)\s*\d+"
    r"|,\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"
)
CONTACT_CN_NUMBER = r"[0-9十百千]+"
# "8号去北京" is the 8th of the month, not house number 8.
CONTACT_CN_DAY_AFTER = (
    r"(?!\s*(?:去|来|來|回|到|要|会|會|那|晚|早|上午|下午|中午|见|見|开|開|出发|考|生日|之前|以后|以後))"
)
CONTACT_CN_STREET = re.compile(
    r"[\u4e00-\u9fff]{0,6}?(?:路|街|大街|大道|巷|胡同)\s*" + CONTACT_CN_NUMBER + r"\s*(?:号|號|弄|巷)"
    r"(?:\s*" + CONTACT_CN_NUMBER + r"\s*(?:号|號))?" + CONTACT_CN_DAY_AFTER
    + r"|(?<![0-9十百千])" + CONTACT_CN_NUMBER + r"\s*(?:号楼|號樓|号館|栋|棟|幢)"
    r"|(?<![0-9十百千])" + CONTACT_CN_NUMBER + r"\s*(?:单元|單元)\s*" + CONTACT_CN_NUMBER
    + r"|(?<!\d)\d{3,4}\s*(?:室|号房|號房|房间|房間)"
    r"|村\s*" + CONTACT_CN_NUMBER + r"\s*(?:组|組|号|號)"
)
CONTACT_JP_STREET = re.compile(
    r"(?<=[\u4e00-\u9fff々])\s*\d{1,4}\s*[-ー‐−の]\s*\d{1,4}\s*[-ー‐−の]\s*\d{1,4}"
    r"|\d{1,4}\s*丁目\s*\d{1,4}(?:\s*(?:番地?|[-ー‐−])\s*\d{1,4}\s*号?)?"
    r"|\d{1,4}\s*番地?\s*\d{1,4}\s*号"
    r"|\d{1,5}\s*番地"
    r"|\d{2,4}\s*号室"
    r"|〒\s*\d{3}\s*-?\s*\d{4}"
)
CONTACT_POSTCODE = re.compile(
    r"(?i:postcode|post code|postal code|zip code|zip|邮编|郵便番号)\s*(?i:is|:|=)?\s*"
    r"(?P<token>[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}|\d{3}-?\d{4}|\d{5}(?:-\d{4})?|\d{6})(?![A-Za-z0-9])"
)
CONTACT_ADDRESS_WORD = re.compile(
    r"(?<!mail )(?<!e-mail )(?<!ip )(?<!web )(?<!ip)\baddress\s*(?:is|:|=)\s*(?P<rest>[^,.;!?，。]{2,})"
    r"|(?:地址|住址|住所|住處|住处)\s*(?:是|は|为|為|:|=|在)\s*(?P<rest2>[^,;!?，。、]{2,})",
    re.IGNORECASE,
)
# "her address is private", "地址是秘密": a refusal to share is not an address.
CONTACT_NOT_SHARED = re.compile(
    r"(?:private|secret|hidden|unknown|a secret|not\b|none|confidential|秘密|保密|不公开|不公開|隐私|隱私|"
    r"ひみつ|非公開|内緒|ない)",
    re.IGNORECASE,
)
CONTACT_HOME_EN = re.compile(
    r"(?i:live[sd]?|living|reside[sd]?|residing|stay(?:s|ing)?)\s+(?i:at)\s+(?:the\s+)?(?!Home\b|Mom|Dad|Uni\b)"
    r"(?P<rest>(?:\d|[A-Z])[^,.;!?]*)"
    r"|(?i:live[sd]?|living|reside[sd]?)\s+on\s+(?P<rest2>(?:[A-Z][\w'\-]*\s+){1,3}" + CONTACT_STREET_SUFFIX + r")\b"
)
CONTACT_LOCALITY = (
    r"(?:小区|小區|社区|社區|新村|家园|家園|公馆|公館|大厦|大廈|花园|花園|公寓|苑|庄园|莊園|别墅|別墅|楼盘|樓盤|"
    r"マンション|アパート|ハイツ|コーポ|団地)"
)
CONTACT_HOME_ZH = re.compile(
    r"(?:住在|住|家在|家住|搬到|搬去|搬进|搬進|住进|住進)(?P<place>[^，。,.!！?？\s的]{1,20}?)" + CONTACT_LOCALITY
)
CONTACT_NAMED_COMPOUND = re.compile(r"(?P<place>[\u4e00-\u9fffA-Za-z0-9]{2,10}?)(?:小区|小區)")
CONTACT_GENERIC_PLACE = re.compile(
    r"(?:一个|一個|个|個|一间|一間|一栋|一棟|栋|一套|套|学校|學校|大学|大學|公司|租的|合租|普通|高档|老|新|了|"
    r"我家|我们|我們|他们|他們|她们|这个|這個|那个|那個|这|這|那|家|附近|门口|門口|里|裡|在|到|去|回|的|们|們)$"
)


def contact_view(text):
    """(view, origin): text NFKC-normalised character by character, format characters dropped.

    origin[i] is the index in text of view[i], so a span found in the view maps back to the
    original text (NFKC can turn one character into several, e.g. "①" stays one, "㍻" two).
    """
    chars = []
    origin = []
    for index, char in enumerate(str(text)):
        if unicodedata.category(char) == "Cf":
            continue
        for piece in unicodedata.normalize("NFKC", char):
            chars.append(piece)
            origin.append(index)
    return "".join(chars), origin


def contact_digit_view(view):
    """view with Chinese numerals as ASCII digits and dates/times/year ranges masked with '#'.

    Same length as view, so spans carry over.
    """
    digits = "".join(CONTACT_NUMERAL_DIGITS.get(char, char) for char in view)
    digits = CONTACT_TIME.sub(contact_mask, digits)
    return CONTACT_DATE.sub(contact_mask, digits)


def contact_mask(match):
    """A regex match replaced by as many '#' (not a digit separator, so runs do not join across it)."""
    return "#" * len(match.group(0))


def contact_number_context(before):
    """The kind the words just before a number give it ("QQ号" -> messaging id), else None."""
    for kind, pattern in CONTACT_NUMBER_CONTEXT:
        if pattern.search(before):
            return kind
    return None


def contact_number_kind(run, before, after):
    """The kind of a phone-like digit run, or None when it is an ordinary number."""
    groups = re.findall(r"\d+", run)
    digits = "".join(groups)
    count = len(digits)
    if run[-1] in "Xx":
        if count == 17:
            return "ID number"
        run = run[:-1].rstrip(" -")
    if count < 7:
        return None
    separators = re.split(r"\d+", run)[1:-1]
    if len(groups) == 2 and separators[0] in (".", ","):
        return None  # a decimal: 3.14159265
    if count <= 12 and (CONTACT_COUNT_AFTER.match(after) or CONTACT_CURRENCY_BEFORE.search(before)
                        or CONTACT_COUNT_BEFORE.search(before)):
        return None  # a count or an amount: "1234567 views", "¥1000000"
    kind = contact_number_context(before[-16:])
    if kind is not None:
        return kind
    if re.fullmatch(r"\d{3}-\d{2}-\d{4}", run):
        return "ID number"  # US social security number
    if count == 18 or count > 19:
        return "ID number"
    if count >= 15:
        return "bank card number"
    return "phone number"


def contact_platform_kind(match, view, find_me, text_end):
    """The kind of a "platform [id marker] token" match, or None when no id follows the platform name.

    find_me: the text has an add-me phrase; text_end: where the text ends, trailing punctuation aside.
    """
    platform = match.group("platform")
    label = (match.group("label") or "").strip()
    marker = (match.group("marker") or "").strip()
    token = match.group("token").rstrip(".-")
    lowered = platform.lower()
    strong = bool(label) or marker in (":", "=") or find_me
    if lowered == "line" and platform != "LINE" and label.lower() not in ("id", "account") and not find_me:
        return None  # "favourite line: ..." is not the LINE app
    if token.lower() in CONTACT_PLAIN_WORDS or len(token) < 2:
        return None
    has_letter = re.search(r"[A-Za-z]", token) is not None
    has_mark = re.search(r"[\d_#]", token) is not None
    if not has_letter and (len(token) < 5 or CONTACT_COUNT_AFTER.match(view, match.end())):
        return None  # "QQ 3 years", "bilibili 100000 views"
    if strong:
        accepted = len(token) >= 3
    elif lowered in CONTACT_AMBIGUOUS_PLATFORMS and platform != "LINE":
        accepted = False
    elif marker:
        accepted = has_mark or "." in token or match.end() >= text_end
    else:
        accepted = has_mark and len(token) >= 4
    if not accepted:
        return None
    return "messaging id" if CONTACT_MESSAGING_NAMES.fullmatch(platform) else "social handle"


def contact_spans(text):
    """Every detected detail of text as (start, end, kind) in text's own positions, in detector order."""
    view, origin = contact_view(text)
    if not view:
        return []
    digits = contact_digit_view(view)
    found = []
    for match in CONTACT_EMAIL.finditer(view):
        found.append((match.start(), match.end(), "e-mail address"))
    for match in CONTACT_EMAIL_SPELLED.finditer(view):
        found.append((match.start(), match.end(), "e-mail address"))
    for match in CONTACT_EMAIL_ID.finditer(view):
        token = match.group("token")
        if re.search(r"[\d_.@]", token) and token.lower() not in CONTACT_PLAIN_WORDS:
            found.append((match.start("token"), match.end("token"), "e-mail address"))
    for match in CONTACT_LINK.finditer(view):
        found.append((match.start(), match.end(), "link"))
    for match in CONTACT_IP.finditer(view):
        found.append((match.start(), match.end(), "IP address"))
    for match in CONTACT_GPS.finditer(view):
        found.append((match.start(), match.end(), "GPS position"))
    find_me = CONTACT_FIND_ME.search(view) is not None
    text_end = len(view.rstrip(" .。!！~～"))
    for match in CONTACT_PLATFORM_ID.finditer(view):
        kind = contact_platform_kind(match, view, find_me, text_end)
        if kind is not None:
            found.append((match.start("token"), match.end("token"), kind))
    for match in CONTACT_DISCORD_TAG.finditer(view):
        found.append((match.start(), match.end(), "messaging id"))
    for match in CONTACT_AT_HANDLE.finditer(view):
        if not CONTACT_AT_NOT_HANDLE.fullmatch(match.group("token")):
            found.append((match.start(), match.end(), "social handle"))
    for match in CONTACT_PASSWORD.finditer(view):
        if match.group("token").lower() not in CONTACT_PLAIN_WORDS:
            found.append((match.start("token"), match.end("token"), "password"))
    for match in CONTACT_PASSPORT.finditer(view):
        found.append((match.start(), match.end(), "ID number"))
    for match in CONTACT_DIGIT_RUN.finditer(digits):
        start = match.start()
        kind = contact_number_kind(match.group(0), view[max(0, start - 24):start], view[match.end():match.end() + 24])
        if kind is not None:
            found.append((start, match.end(), kind))
    for match in CONTACT_SHORT_NUMBER.finditer(view):
        kind = contact_number_context(match.group(0)[: match.start("digits") - match.start()]) or "ID number"
        found.append((match.start("digits"), match.end("digits"), kind))
    for match in CONTACT_DIGIT_WORDS.finditer(view):
        found.append((match.start(), match.end(), "phone number"))
    for match in CONTACT_POSTCODE.finditer(view):
        found.append((match.start("token"), match.end("token"), "postal code"))
    for pattern in (CONTACT_EN_STREET, CONTACT_CN_STREET, CONTACT_JP_STREET):
        for match in pattern.finditer(digits):
            found.append((match.start(), match.end(), "street address"))
    for match in CONTACT_ADDRESS_WORD.finditer(view):
        group = "rest" if match.group("rest") is not None else "rest2"
        if CONTACT_NOT_SHARED.match(match.group(group)):
            continue
        found.append((match.start(group), match.end(group), "street address"))
    for match in CONTACT_HOME_EN.finditer(view):
        group = "rest" if match.group("rest") is not None else "rest2"
        found.append((match.start(group), match.end(group), "home location"))
    for pattern in (CONTACT_HOME_ZH, CONTACT_NAMED_COMPOUND):
        for match in pattern.finditer(view):
            place = match.group("place")
            if len(place) >= 2 and not CONTACT_GENERIC_PLACE.search(place):
                found.append((match.start("place"), match.end(), "home location"))
    # What redact_contact_details already hid ("address: [hidden]") is not a detail again.
    hidden = [(match.start(), match.end()) for match in re.finditer(re.escape(CONTACT_PLACEHOLDER), view)]
    return [
        (origin[start], origin[end - 1] + 1, kind) for start, end, kind in found
        if end > start and not any(low <= start and end <= high for low, high in hidden)
    ]


def find_contact_detail(text):
    """None if text is an ordinary fact, else the kind of contact or identifying detail it carries."""
    spans = contact_spans(text)
    return spans[0][2] if spans else None


def contact_detail_error(kind):
    """The message for the model (the tool prefixes "Error: "): what was refused and what to do instead."""
    kind = " ".join(str(kind or "contact detail").split())[:40]
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if kind in ("street address", "home location", "postal code", "GPS position"):
        harmless = "Store only the harmless part, e.g. 'lives in Shanghai' instead of the address."
    elif kind in ("messaging id", "social handle", "link", "account ID", "e-mail address"):
        harmless = "Store only the harmless part, e.g. 'is on Discord' instead of the id or link."
    else:
        harmless = "A number like this has no harmless part: store nothing."
    return (
        f"that looks like {article} {kind}. Contact and identifying details are never stored: anything in "
        "memory can be read aloud on stream. Do not save it; kindly ask the viewer not to share such details "
        f"in chat. {harmless}"
    )


def redact_contact_details(text):
    """text with every detected detail replaced by "[hidden]" (for platform fields such as display names)."""
    text = str(text)
    merged = []
    for start, end in sorted((start, end) for start, end, _ in contact_spans(text)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces = []
    position = 0
    for start, end in merged:
        pieces.append(text[position:start])
        pieces.append(CONTACT_PLACEHOLDER)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)
