package stripefake

import (
	"crypto/sha256"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Metadata limits Stripe enforces.
const (
	maxMetadataKeys     = 50
	maxMetadataKeyLen   = 40
	maxMetadataValueLen = 500
)

// params is a decoded Stripe form: keys in canonical bracket form
// ("line_items[0][price_data][currency]", "expand[0]"), one value each.
// Accessors record the first problem in err, so a handler reads every
// parameter and then checks err once.
type params struct {
	vals map[string]string
	err  *apiError
}

// parseParams decodes form values. "a[]" keys become "a[0]", "a[1]", ... in
// the order given, as Stripe reads them.
func parseParams(raw url.Values) (*params, *apiError) {
	p := &params{vals: make(map[string]string, len(raw))}
	for key, values := range raw {
		if _, ok := splitKey(key); !ok {
			return nil, badParam(key, "", "Invalid parameter name: %s", key)
		}
		if strings.Contains(key, "[]") {
			for i, v := range values {
				p.vals[strings.Replace(key, "[]", "["+strconv.Itoa(i)+"]", 1)] = v
			}
			continue
		}
		// Stripe reads the last value of a repeated scalar.
		p.vals[key] = values[len(values)-1]
	}
	return p, nil
}

// splitKey splits "a[b][0]" into ["a", "b", "0"].
func splitKey(key string) ([]string, bool) {
	name, rest, _ := strings.Cut(key, "[")
	if name == "" {
		return nil, false
	}
	segs := []string{name}
	if rest == "" && !strings.Contains(key, "[") {
		return segs, true
	}
	rest = "[" + rest
	for rest != "" {
		if rest[0] != '[' {
			return nil, false
		}
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return nil, false
		}
		segs = append(segs, rest[1:end])
		rest = rest[end+1:]
	}
	return segs, true
}

// pattern turns a canonical key into its schema pattern: list indices become
// "#" and metadata keys "*" ("line_items[#][quantity]", "metadata[*]").
func pattern(key string) string {
	segs, _ := splitKey(key)
	var b strings.Builder
	b.WriteString(segs[0])
	for i := 1; i < len(segs); i++ {
		seg := segs[i]
		switch {
		case segs[i-1] == "metadata":
			seg = "*"
		case seg == "" || isDigits(seg):
			seg = "#"
		}
		b.WriteString("[" + seg + "]")
	}
	return b.String()
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// checkKnown rejects the first parameter (in sorted order, so the answer is
// stable) whose pattern is not in allowed.
func (p *params) checkKnown(allowed map[string]bool) *apiError {
	keys := make([]string, 0, len(p.vals))
	for k := range p.vals {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !allowed[pattern(k)] {
			return unknownParam(k)
		}
	}
	return nil
}

// fingerprint identifies a request for idempotency: the same method, path and
// parameters give the same fingerprint whatever their order.
func fingerprint(method, path string, p *params) [32]byte {
	keys := make([]string, 0, len(p.vals))
	for k := range p.vals {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	h.Write([]byte(method + " " + path + "\n"))
	for _, k := range keys {
		h.Write([]byte(url.QueryEscape(k) + "=" + url.QueryEscape(p.vals[k]) + "&"))
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

func (p *params) fail(e *apiError) {
	if p.err == nil {
		p.err = e
	}
}

func (p *params) has(key string) bool {
	_, ok := p.vals[key]
	return ok
}

// str returns a string parameter, "" when absent.
func (p *params) str(key string) string {
	return p.vals[key]
}

// require records parameter_missing for the first absent key, and Stripe's
// parameter_invalid_empty for an empty one.
func (p *params) require(keys ...string) {
	for _, k := range keys {
		v, ok := p.vals[k]
		if !ok {
			p.fail(missingParam(k))
			return
		}
		if v == "" {
			p.fail(badParam(k, "parameter_invalid_empty",
				"You passed an empty string for '%s'. We assume empty values are an attempt to unset a parameter; however '%s' cannot be unset. You should remove '%s' from your request or supply a non-empty value.", k, k, k))
			return
		}
	}
}

// int returns an integer parameter and whether it was present.
func (p *params) int(key string) (int64, bool) {
	v, ok := p.vals[key]
	if !ok || v == "" {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		p.fail(badParam(key, "parameter_invalid_integer", "Invalid integer: %s", v))
		return 0, false
	}
	return n, true
}

// bool returns a boolean parameter; absent is false.
func (p *params) bool(key string) bool {
	v, ok := p.vals[key]
	if !ok || v == "" {
		return false
	}
	switch v {
	case "true":
		return true
	case "false":
		return false
	}
	p.fail(badParam(key, "", "Invalid boolean: %s", v))
	return false
}

// enum returns a string parameter that must be one of allowed (or absent).
func (p *params) enum(key string, allowed ...string) string {
	v, ok := p.vals[key]
	if !ok || v == "" {
		return ""
	}
	if !slices.Contains(allowed, v) {
		p.fail(badParam(key, "", "Invalid %s: must be one of %s", key, strings.Join(allowed, ", ")))
		return ""
	}
	return v
}

// maxLen records an error when a string parameter is longer than n characters.
func (p *params) maxLen(key string, n int) {
	if utf8.RuneCountInString(p.vals[key]) > n {
		p.fail(badParam(key, "", "Invalid string: %s...; must be at most %d characters", truncate(p.vals[key], 10), n))
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// list returns key[0], key[1], ... in index order.
func (p *params) list(key string) []string {
	var out []string
	for _, i := range p.indices(key) {
		out = append(out, p.vals[key+"["+strconv.Itoa(i)+"]"])
	}
	return out
}

// indices returns the distinct list indices present under key, sorted.
func (p *params) indices(key string) []int {
	prefix := key + "["
	seen := map[int]bool{}
	for k := range p.vals {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		idx, _, ok := strings.Cut(rest, "]")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(idx)
		if err == nil {
			seen[n] = true
		}
	}
	out := make([]int, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

// metadata returns the map under key ("metadata", "payment_intent_data[metadata]"),
// never nil, with Stripe's limits checked. Empty values are dropped, as Stripe
// treats them as unsetting the key.
func (p *params) metadata(key string) map[string]string {
	prefix := key + "["
	md := map[string]string{}
	for k, v := range p.vals {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok || !strings.HasSuffix(rest, "]") {
			continue
		}
		mk := strings.TrimSuffix(rest, "]")
		if utf8.RuneCountInString(mk) > maxMetadataKeyLen {
			p.fail(badParam(k, "", "Metadata keys can have up to %d characters (key %q is too long).", maxMetadataKeyLen, mk))
			continue
		}
		if utf8.RuneCountInString(v) > maxMetadataValueLen {
			p.fail(badParam(k, "", "Metadata values can have up to %d characters, but you passed in a value that is %d characters.", maxMetadataValueLen, utf8.RuneCountInString(v)))
			continue
		}
		if v != "" {
			md[mk] = v
		}
	}
	if len(md) > maxMetadataKeys {
		p.fail(badParam(key, "", "You can specify up to %d keys in %s.", maxMetadataKeys, key))
	}
	return md
}

// expand returns the expand[] paths.
func (p *params) expand() expandSet {
	list := p.list("expand")
	if len(list) == 0 {
		return nil
	}
	set := make(expandSet, len(list))
	for _, e := range list {
		set[e] = true
	}
	return set
}

// expandSet holds dotted expand paths ("payment_method", "setup_intent.payment_method").
type expandSet map[string]bool

// has reports whether field is expanded, directly or because a path below
// it is ("setup_intent.payment_method" expands setup_intent too).
func (e expandSet) has(field string) bool {
	if e[field] {
		return true
	}
	for k := range e {
		if strings.HasPrefix(k, field+".") {
			return true
		}
	}
	return false
}

// sub returns the paths below field, for expanding inside an expanded object.
func (e expandSet) sub(field string) expandSet {
	var out expandSet
	for k := range e {
		if rest, ok := strings.CutPrefix(k, field+"."); ok {
			if out == nil {
				out = expandSet{}
			}
			out[rest] = true
		}
	}
	return out
}

// check rejects a path (or path prefix) that the object cannot expand.
func (e expandSet) check(allowed ...string) *apiError {
	for k := range e {
		if !slices.Contains(allowed, k) {
			return badParam("expand", "", "This property cannot be expanded (%s).", k)
		}
	}
	return nil
}
