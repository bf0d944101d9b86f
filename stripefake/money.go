package stripefake

import (
	"fmt"
	"strings"
)

// maxAmount is Stripe's largest amount (eight digits in the minor unit).
const maxAmount = 99_999_999

// currencies Stripe accepts for card payments.
var currencies = setOf(strings.Fields(`
usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob
brl bsd bwp byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb
eur fjd fkp gbp gel gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod
jpy kes kgs khr kmf krw kwd kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt
mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln
pyg qar ron rsd rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs tnd
top try ttd twd tzs uah ugx uyu uzs vnd vuv wst xaf xcd xof xpf yer zar zmw`)...)

// zeroDecimal currencies have no minor unit: 500 JPY is amount=500.
var zeroDecimal = setOf("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga",
	"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf")

// threeDecimal currencies must be charged in multiples of 10 of the minor unit.
var threeDecimal = setOf("bhd", "jod", "kwd", "omr", "tnd")

// minCharge is Stripe's minimum charge amount in the minor unit, for the
// currencies Stripe publishes one for.
var minCharge = map[string]int64{
	"usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
	"czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500,
	"inr": 50, "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50,
	"pln": 200, "ron": 200, "sek": 300, "sgd": 50, "thb": 1000,
}

func setOf(items ...string) map[string]bool {
	m := make(map[string]bool, len(items))
	for _, it := range items {
		m[it] = true
	}
	return m
}

// checkCurrency normalises a currency code to lower case and rejects one
// Stripe does not support.
func checkCurrency(param, c string) (string, *apiError) {
	lc := strings.ToLower(c)
	if !currencies[lc] {
		return "", badParam(param, "", "Invalid currency: %s. Stripe currently supports these currencies: %s", c, "usd, eur, gbp, jpy, ...")
	}
	return lc, nil
}

// checkAmount applies Stripe's rules for a charge amount in currency.
func checkAmount(param string, amount int64, currency string) *apiError {
	switch {
	case amount < 1:
		return badParam(param, "parameter_invalid_integer", "This value must be greater than or equal to 1.")
	case amount > maxAmount:
		return badParam(param, "amount_too_large", "Amount must be no more than %s", formatAmount(maxAmount, currency))
	case amount < minCharge[currency]:
		return badParam(param, "amount_too_small", "Amount must be at least %s", formatAmount(minCharge[currency], currency))
	case threeDecimal[currency] && amount%10 != 0:
		return badParam(param, "invalid_amount", "Amounts in %s must be a multiple of 10 (the last digit must be 0).", strings.ToUpper(currency))
	}
	return nil
}

// formatAmount renders a minor-unit amount for messages ("0.50 usd", "50 jpy").
func formatAmount(amount int64, currency string) string {
	switch {
	case zeroDecimal[currency]:
		return fmt.Sprintf("%d %s", amount, currency)
	case threeDecimal[currency]:
		return fmt.Sprintf("%d.%03d %s", amount/1000, amount%1000, currency)
	}
	return fmt.Sprintf("%d.%02d %s", amount/100, amount%100, currency)
}
