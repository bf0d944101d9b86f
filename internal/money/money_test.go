package money_test

import (
	"context"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/money"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func TestFormat(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		amount   int64
		currency string
		want     string
	}{
		{1099, "usd", "$10.99"},
		{1099, "USD", "$10.99"},
		{5, "usd", "$0.05"},
		{0, "usd", "$0.00"},
		{100000000, "usd", "$1,000,000.00"},
		{-50, "eur", "-€0.50"},
		{123450, "eur", "€1,234.50"},
		{5000, "jpy", "¥5,000"},
		{1, "jpy", "¥1"},
		{999, "jpy", "¥999"},
		{1000, "krw", "₩1,000"},
		{1234567, "krw", "₩1,234,567"},
		{1234, "bhd", "BHD 1.234"},
		{5, "kwd", "KWD 0.005"},
		{1234567, "tnd", "TND 1,234.567"},
		{1200, "chf", "CHF 12.00"},
		{500, "clp", "CLP 500"},
		{5000, "xaf", "FCFA 5,000"},
		{1099, "cad", "CA$10.99"},
		{math.MaxInt64, "usd", "$92,233,720,368,547,758.07"},
		{math.MinInt64, "jpy", "-¥9,223,372,036,854,775,808"},
	} {
		got, err := money.Format(tc.amount, tc.currency)
		require.NoError(t, err, "%d %s", tc.amount, tc.currency)
		require.Equal(t, tc.want, got, "%d %s", tc.amount, tc.currency)
	}
}

func TestDecimal(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		amount   int64
		currency string
		want     string
	}{
		{1099, "usd", "10.99"},
		{123456, "usd", "1234.56"},
		{5000, "jpy", "5000"},
		{1234, "bhd", "1.234"},
		{7, "jod", "0.007"},
		{-50, "eur", "-0.50"},
	} {
		got, err := money.Decimal(tc.amount, tc.currency)
		require.NoError(t, err)
		require.Equal(t, tc.want, got, "%d %s", tc.amount, tc.currency)
	}
}

func TestUnknownCurrency(t *testing.T) {
	t.Parallel()
	for _, c := range []string{"xyz", "", "usdd", "us"} {
		_, err := money.Format(100, c)
		require.Error(t, err, c)
		_, err = money.Decimal(100, c)
		require.Error(t, err, c)
		_, ok := money.Exponent(c)
		require.False(t, ok, c)
	}
}

func TestExponent(t *testing.T) {
	t.Parallel()
	for code, want := range map[string]int{"usd": 2, "JPY": 0, "krw": 0, "bhd": 3, "kwd": 3, "isk": 2, "ugx": 0} {
		got, ok := money.Exponent(code)
		require.True(t, ok, code)
		require.Equal(t, want, got, code)
	}
	// Exponents is a copy: changing it changes nothing here.
	m := money.Exponents()
	m["usd"] = 7
	got, _ := money.Exponent("usd")
	require.Equal(t, 2, got)
}

// TestExponentsMatchDatabase keeps the Go table equal to billing.currencies, which the database
// uses to reject charges in currencies billingd cannot format or charge.
func TestExponentsMatchDatabase(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	rows, err := pool.Query(context.Background(), `select code, exponent from billing.currencies`)
	require.NoError(t, err)
	db := map[string]int{}
	for rows.Next() {
		var code string
		var exp int16
		require.NoError(t, rows.Scan(&code, &exp))
		db[code] = int(exp)
	}
	require.NoError(t, rows.Err())
	require.NotEmpty(t, db)
	require.Equal(t, db, money.Exponents())
}
