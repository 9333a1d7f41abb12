package console

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"
)

// safeNext keeps a post-sign-in destination on this site.
func safeNext(next string) string {
	if next == "" || !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") || strings.HasPrefix(next, "/\\") {
		return "/"
	}
	return next
}

func (s *Server) loginPage(w http.ResponseWriter, r *http.Request) {
	s.render(w, &request{Request: r}, "login.html", map[string]any{
		"OIDC": s.cfg.OIDCIssuer != "", "Local": len(s.auth.users) > 0, "Next": safeNext(r.URL.Query().Get("next")),
		"Error": r.URL.Query().Get("error"),
	})
}

// loginOIDC starts the authorisation code flow with PKCE: the verifier and
// the nonce stay in the session bucket under the state, which is all the
// browser carries.
func (s *Server) loginOIDC(w http.ResponseWriter, r *http.Request) {
	if s.cfg.OIDCIssuer == "" {
		http.Error(w, "single sign-on is not configured", http.StatusNotFound)
		return
	}
	oc, _, err := s.auth.oidcClient(r.Context())
	if err != nil {
		s.log.Error("console: sign-in", "error", err)
		http.Error(w, "the identity provider cannot be reached: "+err.Error(), http.StatusBadGateway)
		return
	}
	state, nonce, verifier := randomToken(), randomToken(), oauth2.GenerateVerifier()
	if err := s.sessions.putLogin(r.Context(), state, pendingLogin{Verifier: verifier, Nonce: nonce,
		Return: safeNext(r.URL.Query().Get("next")), Expires: s.now().Add(loginTTL)}); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	http.Redirect(w, r, oc.AuthCodeURL(state, oidc.Nonce(nonce), oauth2.S256ChallengeOption(verifier)), http.StatusFound)
}

// callback finishes the code flow: one use of the state, the code
// exchanged with the PKCE verifier, the ID token verified (issuer,
// audience, expiry, signature) and its nonce checked.
func (s *Server) callback(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if e := q.Get("error"); e != "" {
		s.loginFailed(w, r, "the identity provider refused: "+e+" "+q.Get("error_description"))
		return
	}
	pending, ok, err := s.sessions.takeLogin(r.Context(), q.Get("state"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	if !ok {
		s.loginFailed(w, r, "this sign-in is unknown, used or expired: start again")
		return
	}
	oc, verifier, err := s.auth.oidcClient(r.Context())
	if err != nil {
		s.loginFailed(w, r, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	tok, err := oc.Exchange(ctx, q.Get("code"), oauth2.VerifierOption(pending.Verifier))
	if err != nil {
		s.loginFailed(w, r, "the code was not accepted: "+err.Error())
		return
	}
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		s.loginFailed(w, r, "the identity provider sent no ID token")
		return
	}
	idt, err := verifier.Verify(ctx, raw)
	if err != nil {
		s.loginFailed(w, r, "the ID token is not valid: "+err.Error())
		return
	}
	if idt.Nonce != pending.Nonce {
		s.loginFailed(w, r, "the ID token is not the answer to this sign-in (nonce)")
		return
	}
	p, err := s.auth.oidcPrincipal(idt)
	if err != nil {
		s.log.Warn("console: sign-in refused", "user", p.Name, "error", err)
		code := http.StatusForbidden
		if !errors.Is(err, ErrNoRole) {
			code = http.StatusBadRequest
		}
		w.WriteHeader(code)
		s.render(w, &request{Request: r}, "error.html", map[string]any{"Status": code, "Message": err.Error()})
		return
	}
	s.startSession(w, r, p, pending.Return)
}

func (s *Server) loginFailed(w http.ResponseWriter, r *http.Request, why string) {
	s.log.Warn("console: sign-in failed", "from", s.source(r), "reason", why)
	http.Redirect(w, r, "/login?error="+url.QueryEscape(why), http.StatusSeeOther)
}

// loginLocal checks a break-glass sign-in. It is refused from another
// site by the cross-origin protection like every other form.
func (s *Server) loginLocal(w http.ResponseWriter, r *http.Request) {
	if len(s.auth.users) == 0 {
		http.Error(w, "local sign-in is not configured", http.StatusNotFound)
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	p, err := s.auth.local(r.PostForm.Get("user"), r.PostForm.Get("password"))
	if err != nil {
		s.loginFailed(w, r, err.Error())
		return
	}
	s.log.Warn("console: break-glass sign-in", "user", p.Name, "role", p.Role.String(), "from", s.source(r))
	s.startSession(w, r, p, safeNext(r.PostForm.Get("next")))
}

func (s *Server) startSession(w http.ResponseWriter, r *http.Request, p Principal, next string) {
	id, _, err := s.sessions.create(r.Context(), p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: id, Path: "/", HttpOnly: true, Secure: s.secure,
		SameSite: http.SameSiteLaxMode, MaxAge: int(s.cfg.SessionTTL.Seconds())})
	s.log.Info("console: signed in", "user", p.Name, "role", p.Role.String(), "via", p.Via, "from", s.source(r))
	http.Redirect(w, r, safeNext(next), http.StatusSeeOther)
}

func (s *Server) logout(r *request) (any, error) {
	if c, err := r.Cookie(sessionCookie); err == nil {
		if err := s.sessions.end(r.Context(), c.Value); err != nil {
			return nil, err
		}
	}
	return redirect("/login?error=" + url.QueryEscape("signed out")), nil
}
