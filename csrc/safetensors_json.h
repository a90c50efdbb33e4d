#pragma once
// A deliberately small JSON reader/writer for safetensors headers. The header is a flat object, so this only needs
// to be strict and bounded, not fast or general: it keeps object members in file order (to spot duplicate names and
// preserve `__metadata__` order), caps nesting depth (a hostile header cannot blow the stack), and never throws
// anything but sgf::SafetensorsFormatError.
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sgf {

struct SafetensorsFormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct JsonValue {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool boolean = false;
    // Numbers are kept as their integer value when they are plain non-negative integers that fit in u64;
    // anything else (sign, fraction, exponent, overflow) is flagged so callers that need an offset can refuse it.
    bool is_u64 = false;
    uint64_t u64 = 0;
    std::string text;  // String value
    std::vector<JsonValue> items;  // Array
    std::vector<std::pair<std::string, JsonValue>> members;  // Object, in file order
};

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

class JsonParser {
public:
    explicit JsonParser(const std::string& text) : s_(text) {}

    JsonValue parse_document() {
        skip_ws();
        JsonValue v = parse_value(0);
        skip_ws();
        if (pos_ != s_.size()) fail("unexpected data after the JSON value");
        return v;
    }

private:
    static constexpr int kMaxDepth = 32;
    const std::string& s_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& why) const {
        throw SafetensorsFormatError("invalid JSON header at byte " + std::to_string(pos_) + ": " + why);
    }

    void skip_ws() {
        // Trailing spaces are how headers are padded, so whitespace must be accepted wherever JSON allows it.
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }

    char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }

    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++pos_;
    }

    JsonValue parse_value(int depth) {
        if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
        if (pos_ >= s_.size()) fail("unexpected end of header");
        char c = s_[pos_];
        JsonValue v;
        if (c == '{') {
            v.kind = JsonValue::Object;
            ++pos_;
            skip_ws();
            if (peek() == '}') { ++pos_; return v; }
            for (;;) {
                skip_ws();
                if (peek() != '"') fail("expected a string key");
                std::string key = parse_string();
                skip_ws();
                expect(':');
                skip_ws();
                v.members.emplace_back(std::move(key), parse_value(depth + 1));
                skip_ws();
                if (peek() == ',') { ++pos_; continue; }
                expect('}');
                return v;
            }
        }
        if (c == '[') {
            v.kind = JsonValue::Array;
            ++pos_;
            skip_ws();
            if (peek() == ']') { ++pos_; return v; }
            for (;;) {
                skip_ws();
                v.items.push_back(parse_value(depth + 1));
                skip_ws();
                if (peek() == ',') { ++pos_; continue; }
                expect(']');
                return v;
            }
        }
        if (c == '"') {
            v.kind = JsonValue::String;
            v.text = parse_string();
            return v;
        }
        if (s_.compare(pos_, 4, "true") == 0) { pos_ += 4; v.kind = JsonValue::Bool; v.boolean = true; return v; }
        if (s_.compare(pos_, 5, "false") == 0) { pos_ += 5; v.kind = JsonValue::Bool; return v; }
        if (s_.compare(pos_, 4, "null") == 0) { pos_ += 4; return v; }
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail(std::string("unexpected character '") + c + "'");
    }

    JsonValue parse_number() {
        JsonValue v;
        v.kind = JsonValue::Number;
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
        v.text = s_.substr(start, pos_ - start);
        v.is_u64 = !negative && !fraction && !overflow;
        v.u64 = value;
        return v;
    }

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
