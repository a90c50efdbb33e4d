#pragma once
// A deliberately small JSON reader/writer for safetensors headers. The header has a fixed shape (an object of
// objects), so the reader is a cursor the caller drives through that shape: it never builds a tree, so neither
// memory nor recursion depth depends on what a hostile header nests, and it never throws anything but
// sgf::SafetensorsFormatError.
#include <cstdint>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sgf {

struct SafetensorsFormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A parsed JSON number. Only plain non-negative integers that fit in u64 are usable as sizes or offsets; anything
// else (sign, fraction, exponent, overflow) is flagged so callers can refuse it with the original text.
struct JsonNumber {
    bool is_u64 = false;
    uint64_t u64 = 0;
    std::string text;
};

// Position of the first bracket nested deeper than `limit`, or -1. A linear scan with no allocation, so junk such as
// 100k opening brackets is refused by name ("nesting") before any parsing starts.
inline long long first_too_deep(const std::string& s, int limit) {
    int depth = 0;
    bool in_string = false;
    for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (in_string) {
            if (c == '\\') ++i;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            if (++depth > limit) return static_cast<long long>(i);
        } else if (c == '}' || c == ']') {
            --depth;
        }
    }
    return -1;
}

// Strict UTF-8 check: no overlong forms, no surrogates, nothing above U+10FFFF. Returns the offending byte offset
// or -1 when valid.
inline long long first_invalid_utf8(const std::string& s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    size_t n = s.size(), i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) { ++i; continue; }
        size_t len;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
        else return static_cast<long long>(i);
        if (i + len > n) return static_cast<long long>(i);
        for (size_t k = 1; k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return static_cast<long long>(i);
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return static_cast<long long>(i);
        i += len;
    }
    return -1;
}

// A cursor over JSON text, driven by the caller's schema instead of building a document tree. A tree costs ~150
// bytes per value, so a hostile 40 MB header of `[0,0,...]` became GBs; walking the text directly keeps memory at
// the size of what the caller decides to keep, and recursion depth at the caller's (fixed) schema depth.
class JsonCursor {
public:
    // `where` (the file name) prefixes every error, so callers need no try/catch to name the file.
    JsonCursor(const std::string& text, std::string where) : s_(text), where_(std::move(where)) {}

    [[noreturn]] void fail(const std::string& why) const {
        throw SafetensorsFormatError(where_ + ": invalid JSON header at byte " + std::to_string(pos_) + ": " + why);
    }

    void skip_ws() {
        // Trailing spaces are how headers are padded, so whitespace must be accepted wherever JSON allows it.
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }

    char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
    bool at_end() const { return pos_ >= s_.size(); }

    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++pos_;
    }

    // Consumes `c` (after whitespace) when it is next; used for the empty-container and separator checks.
    bool take(char c) {
        skip_ws();
        if (peek() != c) return false;
        ++pos_;
        return true;
    }

    // After one member or item: true when another follows (',' consumed), false at `close` (consumed).
    bool next_or_close(char close) {
        skip_ws();
        if (peek() == ',') { ++pos_; skip_ws(); return true; }
        expect(close);
        return false;
    }

    std::string key() {
        skip_ws();
        if (peek() != '"') fail("expected a string key");
        std::string k = parse_string();
        skip_ws();
        expect(':');
        skip_ws();
        return k;
    }

    std::string parse_string_value() {
        skip_ws();
        if (peek() != '"') fail("expected a string");
        return parse_string();
    }

    JsonNumber parse_number() {
        skip_ws();
        JsonNumber v;
        size_t start = pos_;
        bool negative = false, fraction = false, overflow = false;
        if (peek() == '-') { negative = true; ++pos_; }
        if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
        if (peek() == '0' && pos_ + 1 < s_.size() && s_[pos_ + 1] >= '0' && s_[pos_ + 1] <= '9')
            fail("number with a leading zero");
        uint64_t value = 0;
        while (peek() >= '0' && peek() <= '9') {
            unsigned d = static_cast<unsigned>(s_[pos_] - '0');
            if (value > (UINT64_MAX - d) / 10) overflow = true;
            else value = value * 10 + d;
            ++pos_;
        }
        if (peek() == '.') {
            fraction = true;
            ++pos_;
            if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
            while (peek() >= '0' && peek() <= '9') ++pos_;
        }
        if (peek() == 'e' || peek() == 'E') {
            fraction = true;
            ++pos_;
            if (peek() == '+' || peek() == '-') ++pos_;
            if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
            while (peek() >= '0' && peek() <= '9') ++pos_;
        }
        // Keep at most a short prefix for error messages: a 40 MB digit string must not be copied around.
        v.text = s_.substr(start, std::min<size_t>(pos_ - start, 32));
        v.is_u64 = !negative && !fraction && !overflow;
        v.u64 = value;
        return v;
    }

private:
    const std::string& s_;
    std::string where_;
    size_t pos_ = 0;

    static void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) out += static_cast<char>(cp);
        else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t parse_hex4() {
        if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
        uint32_t cp = 0;
        for (int k = 0; k < 4; ++k) {
            char h = s_[pos_++];
            cp <<= 4;
            if (h >= '0' && h <= '9') cp |= static_cast<uint32_t>(h - '0');
            else if (h >= 'a' && h <= 'f') cp |= static_cast<uint32_t>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') cp |= static_cast<uint32_t>(h - 'A' + 10);
            else fail("bad hex digit in \\u escape");
        }
        return cp;
    }

public:
    std::string parse_string() {
        expect('"');
        std::string out;
        for (;;) {
            if (pos_ >= s_.size()) fail("unterminated string");
            unsigned char c = static_cast<unsigned char>(s_[pos_++]);
            if (c == '"') return out;
            if (c < 0x20) fail("raw control character in a string");
            if (c != '\\') { out += static_cast<char>(c); continue; }
            if (pos_ >= s_.size()) fail("unterminated escape");
            char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = parse_hex4();
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        if (s_.compare(pos_, 2, "\\u") != 0) fail("unpaired surrogate in \\u escape");
                        pos_ += 2;
                        uint32_t low = parse_hex4();
                        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate in \\u escape");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        fail("unpaired surrogate in \\u escape");
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: fail(std::string("unknown escape '\\") + e + "'");
            }
        }
    }
};

// Escapes the way serde_json does (short forms where JSON has them, \u00XX for other control bytes, UTF-8 raw),
// so a header we rewrite is never longer than the one safetensors wrote for the same names.
inline void append_json_string(std::string& out, const std::string& s) {
    static const char* hex = "0123456789abcdef";
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    out += "\\u00";
                    out += hex[c >> 4];
                    out += hex[c & 0xF];
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    out += '"';
}

}  // namespace sgf
