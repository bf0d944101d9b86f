// Package money holds billingd's rules for amounts: every amount is an int64 count of the
// currency's minor unit, exactly as Stripe counts it (1099 USD is $10.99, 5000 JPY is ¥5,000,
// 1234 BHD is BHD 1.234), and the exponent of each currency says where the decimal point goes.
//
// The exponent table here is the same as the billing.currencies table in the database (a test
// keeps the two equal). Like Stripe, it gives JPY, KRW and the other zero-decimal currencies
// exponent 0 and BHD, JOD, KWD, OMR and TND exponent 3; ISK, HUF and TWD keep exponent 2, the way
// Stripe counts them.
//
// Formatting is for people (notifications, pages): English conventions, a comma between
// thousands and a point before the minor digits, with a symbol where it is unambiguous in
// English ("$10.99", "¥5,000", "€1,234.50") and the ISO code otherwise ("CHF 12.00",
// "BHD 1.234"). Machine-readable payloads carry the integer amount and the currency code.
package money

import (
	"fmt"
	"maps"
	"strconv"
	"strings"
)

// exponents is the number of minor-unit digits of each currency Stripe charges in, keyed by
// the lowercase ISO 4217 code. Keep it equal to billing.currencies (see money_test.go).
var exponents = map[string]int{
	"aed": 2, "afn": 2, "all": 2, "amd": 2, "ang": 2, "aoa": 2, "ars": 2, "aud": 2, "awg": 2, "azn": 2,
	"bam": 2, "bbd": 2, "bdt": 2, "bgn": 2, "bhd": 3, "bif": 0, "bmd": 2, "bnd": 2, "bob": 2, "brl": 2,
	"bsd": 2, "bwp": 2, "byn": 2, "bzd": 2, "cad": 2, "cdf": 2, "chf": 2, "clp": 0, "cny": 2, "cop": 2,
	"crc": 2, "cve": 2, "czk": 2, "djf": 0, "dkk": 2, "dop": 2, "dzd": 2, "egp": 2, "etb": 2, "eur": 2,
	"fjd": 2, "fkp": 2, "gbp": 2, "gel": 2, "gip": 2, "gmd": 2, "gnf": 0, "gtq": 2, "gyd": 2, "hkd": 2,
	"hnl": 2, "htg": 2, "huf": 2, "idr": 2, "ils": 2, "inr": 2, "isk": 2, "jmd": 2, "jod": 3, "jpy": 0,
	"kes": 2, "kgs": 2, "khr": 2, "kmf": 0, "krw": 0, "kwd": 3, "kyd": 2, "kzt": 2, "lak": 2, "lbp": 2,
	"lkr": 2, "lrd": 2, "lsl": 2, "mad": 2, "mdl": 2, "mga": 0, "mkd": 2, "mmk": 2, "mnt": 2, "mop": 2,
	"mur": 2, "mvr": 2, "mwk": 2, "mxn": 2, "myr": 2, "mzn": 2, "nad": 2, "ngn": 2, "nio": 2, "nok": 2,
	"npr": 2, "nzd": 2, "omr": 3, "pab": 2, "pen": 2, "pgk": 2, "php": 2, "pkr": 2, "pln": 2, "pyg": 0,
	"qar": 2, "ron": 2, "rsd": 2, "rub": 2, "rwf": 0, "sar": 2, "sbd": 2, "scr": 2, "sek": 2, "sgd": 2,
	"shp": 2, "sle": 2, "sos": 2, "srd": 2, "std": 2, "szl": 2, "thb": 2, "tjs": 2, "tnd": 3, "top": 2,
	"try": 2, "ttd": 2, "twd": 2, "tzs": 2, "uah": 2, "ugx": 0, "usd": 2, "uyu": 2, "uzs": 2, "vnd": 0,
	"vuv": 0, "wst": 2, "xaf": 0, "xcd": 2, "xof": 0, "xpf": 0, "yer": 2, "zar": 2, "zmw": 2,
}

// symbols are the English-language symbols (CLDR "en") of currencies whose symbol is not
// ambiguous there, with the space that a word-like symbol needs before the number. Every other
// currency is written with its ISO code and a space.
var symbols = map[string]string{
	"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "krw": "₩", "inr": "₹", "ils": "₪",
	"vnd": "₫", "php": "₱", "cny": "CN¥", "cad": "CA$", "aud": "A$", "nzd": "NZ$", "hkd": "HK$",
	"mxn": "MX$", "brl": "R$", "twd": "NT$", "xcd": "EC$", "xaf": "FCFA ", "xof": "F CFA ", "xpf": "CFPF ",
}

// Exponent returns the number of minor-unit digits of currency (an ISO 4217 code, any case):
// 2 for USD, 0 for JPY, 3 for BHD. ok is false for a currency billingd does not charge in.
func Exponent(currency string) (exp int, ok bool) {
	exp, ok = exponents[strings.ToLower(currency)]
	return exp, ok
}

// Exponents returns a copy of the whole exponent table, keyed by lowercase ISO code.
func Exponents() map[string]int {
	return maps.Clone(exponents)
}

// Format writes amount (minor units) of currency for a person: "$10.99" for 1099 USD,
// "¥5,000" for 5000 JPY, "BHD 1.234" for 1234 BHD, "-€0.50" for -50 EUR. It fails only for a
// currency that is not in the table.
func Format(amount int64, currency string) (string, error) {
	code := strings.ToLower(currency)
	exp, ok := exponents[code]
	if !ok {
		return "", fmt.Errorf("money: unknown currency %q", currency)
	}
	sign := ""
	if amount < 0 {
		sign = "-"
	}
	num := digits(amount, exp, true)
	if sym, ok := symbols[code]; ok {
		return sign + sym + num, nil
	}
	return sign + strings.ToUpper(code) + " " + num, nil
}

// Decimal writes amount (minor units) of currency as a plain decimal number for machines:
// "10.99" for 1099 USD, "5000" for 5000 JPY, "1.234" for 1234 BHD, "-0.50" for -50 EUR.
// It fails only for a currency that is not in the table.
func Decimal(amount int64, currency string) (string, error) {
	exp, ok := Exponent(currency)
	if !ok {
		return "", fmt.Errorf("money: unknown currency %q", currency)
	}
	s := digits(amount, exp, false)
	if amount < 0 {
		s = "-" + s
	}
	return s, nil
}

// digits writes |amount| with exp minor digits, grouping thousands with commas when group is
// set. It works on the decimal string, so that math.MinInt64 is written right too.
func digits(amount int64, exp int, group bool) string {
	s := strconv.FormatInt(amount, 10)
	s = strings.TrimPrefix(s, "-")
	if len(s) <= exp {
		s = strings.Repeat("0", exp-len(s)+1) + s
	}
	whole, frac := s[:len(s)-exp], s[len(s)-exp:]
	if group && len(whole) > 3 {
		var b strings.Builder
		head := len(whole) % 3
		if head > 0 {
			b.WriteString(whole[:head])
		}
		for i := head; i < len(whole); i += 3 {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(whole[i : i+3])
		}
		whole = b.String()
	}
	if exp == 0 {
		return whole
	}
	return whole + "." + frac
}
