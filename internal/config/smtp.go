package config

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
)

// SMTPSettings is BILLING_SMTP_URL taken apart.
type SMTPSettings struct {
	Host     string
	Port     int
	Username string // empty: no SMTP AUTH
	Password string
	// TLS is how the connection is encrypted: "starttls" (required; the default for smtp://),
	// "opportunistic" (STARTTLS when the server offers it), "off" (plain text, for a relay on
	// the same host or in tests) or "implicit" (smtps://, TLS from the first byte).
	TLS string
}

// ParseSMTPURL reads an SMTP URL: smtp://[user[:password]@]host[:port][?starttls=required|opportunistic|off]
// (port 587 by default) or smtps://[user[:password]@]host[:port] (port 465 by default). The
// error never repeats the URL, which may hold a password.
func ParseSMTPURL(s string) (SMTPSettings, error) {
	bad := errors.New("BILLING_SMTP_URL must look like smtp://user:password@host:587 or smtps://user:password@host:465")
	u, err := url.Parse(s)
	if err != nil || u.Hostname() == "" || u.Path != "" && u.Path != "/" {
		return SMTPSettings{}, bad
	}
	var st SMTPSettings
	st.Host = u.Hostname()
	switch u.Scheme {
	case "smtp":
		st.Port, st.TLS = 587, "starttls"
		switch v := u.Query().Get("starttls"); v {
		case "", "required":
		case "opportunistic", "off":
			st.TLS = v
		default:
			return SMTPSettings{}, fmt.Errorf("BILLING_SMTP_URL: starttls=%q must be required, opportunistic or off", v)
		}
	case "smtps":
		st.Port, st.TLS = 465, "implicit"
		if u.RawQuery != "" {
			return SMTPSettings{}, errors.New("BILLING_SMTP_URL: smtps:// takes no query parameters")
		}
	default:
		return SMTPSettings{}, bad
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return SMTPSettings{}, errors.New("BILLING_SMTP_URL: the port must be between 1 and 65535")
		}
		st.Port = n
	}
	if u.User != nil {
		st.Username = u.User.Username()
		st.Password, _ = u.User.Password()
	}
	return st, nil
}
